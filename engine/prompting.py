"""Messages -> prompt token ids, by `--model-type` family or the tokenizer's own template."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from engine.templates import ChatTemplate, get_template
from engine.types import ChatMessage

log = logging.getLogger(__name__)


class PromptBuilder:
    """Owns the chat format: rendering, tokenizing, and what ends an answer."""

    def __init__(self, tokenizer, model_type: Optional[str], generation_eos: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._template: Optional[ChatTemplate] = get_template(model_type) if model_type else None
        if self._template is None and not getattr(tokenizer, "chat_template", None):
            log.warning("the tokenizer has no chat template and no --model-type was given; using chatml")
            self._template = get_template("chatml")
        self.stop_strings: tuple[str, ...] = self._template.stop if self._template else ()
        self.eos_token_ids: frozenset[int] = frozenset(
            self._eos_ids(generation_eos) | self._single_token_ids(self.stop_strings)
        )

    @property
    def family(self) -> str:
        return type(self._template).__name__ if self._template else "tokenizer"

    def render(self, messages: Sequence[ChatMessage]) -> str:
        if self._template is not None:
            return self._template.render(messages)
        return self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        # the rendered text already holds any BOS the format wants
        return self._tokenizer(self.render(messages), add_special_tokens=False).input_ids

    def encode_raw(self, prompt: str) -> list[int]:
        """A plain completion prompt gets the tokenizer's usual special tokens."""
        return self._tokenizer(prompt).input_ids

    def _eos_ids(self, generation_eos: Sequence[int]) -> set[int]:
        ids = set(generation_eos)
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        return ids

    def _single_token_ids(self, strings: Sequence[str]) -> set[int]:
        """Stop strings that are one special token are cheaper to stop on by id."""
        ids = set()
        unk = self._tokenizer.unk_token_id
        for text in strings:
            token_id = self._tokenizer.convert_tokens_to_ids(text)
            if isinstance(token_id, int) and token_id != unk:
                ids.add(token_id)
        return ids
