"""Messages -> prompt token ids, by `--model-type` family or the tokenizer's own template."""

from __future__ import annotations

import logging
import re
from typing import Iterator, Optional, Sequence

from engine.templates import ChatTemplate, get_template
from engine.types import ChatMessage

log = logging.getLogger(__name__)

# Placeholders for message contents while a template is rendered: private-use
# characters, found in the rendered skeleton only (contents are never searched).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"


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
        special = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        self._special_ids = frozenset(special)
        self._special_by_text = {text: i for i, text in special.items()}
        # template text is ours, not the user's: splitting it at control tokens is safe
        self._special_pattern = re.compile(
            "|".join(re.escape(t) for t in sorted(self._special_by_text, key=len, reverse=True))
        ) if special else None

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
        """Prompt ids in which only the chat template puts control tokens.

        Text that spells a control token (`<|im_end|>` in a question, a
        system prompt or a document) is tokenized as plain text, so no message
        can close its turn and open another role's.
        """
        # the rendered text already holds any BOS the format wants
        ids = self._tokenizer(self.render(messages), add_special_tokens=False).input_ids
        if self._special_pattern is None or self._controls(ids) == self._controls(self._skeleton_ids(messages)):
            return ids  # every control token came from the template: the usual tokenization stands
        return self._encode_with_plain_contents(messages)

    def _controls(self, ids: Sequence[int]) -> list[int]:
        return [i for i in ids if i in self._special_ids]

    def _skeleton(self, messages: Sequence[ChatMessage]) -> str:
        """The rendered conversation with a numbered placeholder for each message's content."""
        return self.render([ChatMessage(m.role, f"{_MARK_OPEN}{i}{_MARK_CLOSE}") for i, m in enumerate(messages)])

    def _skeleton_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._tokenizer(self._skeleton(messages), add_special_tokens=False).input_ids

    def _encode_with_plain_contents(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Control tokens from the template's own text; each run between them (template text and
        contents) tokenized with control-token matching off."""
        ids: list[int] = []
        run: list[str] = []
        for text, content_index in _split_marks(self._skeleton(messages)):
            if content_index is not None:
                run.append(messages[content_index].content)
                continue
            for piece, control in self._split_controls(text):
                if control is None:
                    run.append(piece)
                else:
                    ids += self._plain("".join(run))
                    ids.append(control)
                    run = []
        return ids + self._plain("".join(run))

    def _split_controls(self, template_text: str) -> Iterator[tuple[str, Optional[int]]]:
        at = 0
        for match in self._special_pattern.finditer(template_text):
            yield template_text[at:match.start()], None
            yield "", self._special_by_text[match.group()]
            at = match.end()
        yield template_text[at:], None

    def _plain(self, text: str) -> list[int]:
        if not text:
            return []
        return self._tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def encode_raw(self, prompt: str) -> list[int]:
        """A plain completion prompt gets the tokenizer's usual special tokens.

        The caller writes the whole model input here, control tokens included
        (this is how a client applies a template of its own). An empty prompt
        starts from the beginning-of-text token, as OpenAI's completions do.
        """
        ids = self._tokenizer(prompt).input_ids
        if not ids:
            start = self._tokenizer.bos_token_id
            ids = [start if start is not None else self._tokenizer.eos_token_id or 0]
        return ids

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


def _split_marks(skeleton: str) -> Iterator[tuple[str, Optional[int]]]:
    """(template text, None) and ("", content index) pieces of a rendered skeleton, in order."""
    at = 0
    while True:
        start = skeleton.find(_MARK_OPEN, at)
        end = skeleton.find(_MARK_CLOSE, start + 1) if start != -1 else -1
        if end == -1:
            yield skeleton[at:], None
            return
        yield skeleton[at:start], None
        yield "", int(skeleton[start + 1:end])
        at = end + 1
