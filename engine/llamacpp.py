"""GGUF models on llama.cpp: its server runs as our child, we keep the prompt and the queue.

llama.cpp's native 4-bit kernels answer a single user several times faster on a
CPU than the dequantised transformers runner, and its server decodes many
sequences together (parallel slots, continuous batching). What stays here is
what must be the same on every backend: the chat template and tokenization
(so text that spells a control token stays text; the server receives token
ids, never a string it could parse), the context arithmetic, and a bounded
first-come queue, because the server itself takes every request it is sent.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import AsyncIterator, Sequence

from engine.admission import TokenAdmission
from engine.generation_defaults import GenerationDefaults
from engine.prompting import PromptBuilder
from engine.remote import RemoteEngine, RemoteSettings, ServerFacts
from engine.types import ChatMessage, GenerationChunk, PromptTooLongError, SamplingParams

#: llama.cpp's sampler chain in the order transformers and vLLM apply these fields: temperature scales the
#: logits before top-k and top-p choose (llama.cpp's own default order applies temperature last)
SAMPLER_ORDER = ["penalties", "temperature", "top_k", "top_p"]
#: prompts longer than this are tokenized off the event loop
INLINE_TOKENIZE_CHARS = 4096


def llamacpp_sampling(params: SamplingParams, template_stops: Sequence[str] = (), context: int = 4096) -> dict:
    """Every field spelled out: llama.cpp's server defaults (top_k 40, min_p 0.05, repeat window 64) differ
    from the protocol's, and a field left out would silently take them."""
    body = {
        "max_tokens": params.max_new_tokens,
        "temperature": 0.0 if params.greedy else params.temperature,
        "top_k": 0 if params.greedy else max(0, params.top_k),
        "top_p": 1.0 if params.greedy else params.top_p,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repeat_penalty": params.repetition_penalty,
        "repeat_last_n": context,  # the whole context, as transformers' repetition_penalty
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "ignore_eos": params.ignore_eos,
        "samplers": SAMPLER_ORDER,
    }
    stops = list(dict.fromkeys([*params.stop, *template_stops]))
    if stops:
        body["stop"] = stops
    if params.seed is not None:
        body["seed"] = params.seed
    return body


class LlamaCppEngine(RemoteEngine):
    backend_name = "llamacpp"

    def __init__(self, settings: RemoteSettings, facts: ServerFacts, prompts: PromptBuilder,
                 admission: TokenAdmission, generation_defaults: GenerationDefaults = GenerationDefaults(),
                 reuse_prompts: bool = True) -> None:
        super().__init__(settings, facts, frozenset(), counts_tokens=True, generation_defaults=generation_defaults)
        self.prompts = prompts
        self.admission = admission
        self.reuse_prompts = reuse_prompts

    # ---- Engine ------------------------------------------------------------------------

    def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        return self._run(lambda: self.prompts.encode_chat(messages), sum(len(m.content) for m in messages),
                         params, request_id)

    def generate_from_prompt(self, prompt: str, params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        return self._run(lambda: self.prompts.encode_raw(prompt), len(prompt), params, request_id)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self.prompts.encode_chat(messages))

    def ignored_params(self, params: SamplingParams) -> list[str]:
        return []  # every field maps onto llama.cpp's sampler

    def health(self) -> dict:
        health = super().health()
        for remote_only in ("sampling_extensions", "unsupported_params", "served_by"):
            health.pop(remote_only, None)
        health.update(
            backend=self.backend_name,
            prompt_format=self.prompts.family,
            token_counts="this process (the model's tokenizer)",
            slots=self.admission.max_running,
            waiting=self.admission.waiting,
            kv_cache_tokens=self.admission.capacity_tokens,
            # llama.cpp fills its cache as answers grow; this is the share reserved for what is admitted
            kv_cache_usage=round(self.admission.reserved_tokens / self.admission.capacity_tokens, 4),
            running=self.admission.running,
        )
        return health

    # ---- internals -----------------------------------------------------------------------

    async def _run(self, encode, text_size: int, params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        ids = await asyncio.to_thread(encode) if text_size > INLINE_TOKENIZE_CHARS else encode()
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(len(ids), self.max_model_len)
        params = replace(params, max_new_tokens=min(params.max_new_tokens, self.max_model_len - len(ids)))
        reserve = len(ids) + params.max_new_tokens
        await self.admission.acquire(reserve)
        try:
            async for chunk in self._stream("completions", {"prompt": ids}, params, request_id, chat=False):
                yield chunk
        finally:
            self.admission.release(reserve)

    def _payload(self, path_body: dict, params: SamplingParams) -> dict:
        # a seeded request is read from scratch: llama.cpp's arithmetic differs between a cached prompt and a
        # fresh one, and a sampled answer would then drift from the one the same seed gave before
        reuse = self.reuse_prompts and params.seed is None
        return {"stream": True, "stream_options": {"include_usage": True}, "cache_prompt": reuse,
                **path_body, **llamacpp_sampling(params, self.prompts.stop_strings, self.max_model_len)}
