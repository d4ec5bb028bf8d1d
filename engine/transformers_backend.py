"""The default backend: a transformers model driven by one scheduler thread, batching every user.

This is the event loop's side: prompts are tokenized off the loop, requests
are handed to the scheduler (engine/scheduler.py, which does all model work
on its own thread), and their tokens come back through a per-request queue.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Optional, Sequence

from engine.base import Engine
from engine.detokenizer import IncrementalDetokenizer
from engine.fused_forward import FusedForward, fusable
from engine.generation_defaults import GenerationDefaults
from engine.prefix_cache import PrefixCache
from engine.prompting import PromptBuilder
from engine.sampling import make_generator
from engine.scheduler import Scheduler
from engine.sequences import BatchLimits, SequenceState
from engine.types import ChatMessage, EngineError, EngineOverloadedError, GenerationChunk, PromptTooLongError, SamplingParams


class TransformersEngine(Engine):
    def __init__(self, model, tokenizer, prompts: PromptBuilder, model_name: str, max_model_len: int,
                 limits: BatchLimits = BatchLimits(), prefix_cache: Optional[PrefixCache] = None,
                 generation_defaults: GenerationDefaults = GenerationDefaults(), fused_step: bool = True) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._prompts = prompts
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.generation_defaults = generation_defaults
        self._device = next(model.parameters()).device
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._scheduler = Scheduler(model, FusedForward(model) if fused_step and fusable(model) else None, pad_id,
                                    prompts.eos_token_ids, limits,
                                    prefix_cache if prefix_cache is not None else PrefixCache(0))
        # request id -> sequence, for abort(); the worker reads `cancelled` flags
        self._live: dict[str, SequenceState] = {}
        self._live_lock = threading.Lock()
        self._rejected = 0

    @property
    def limits(self) -> BatchLimits:
        return self._scheduler.limits

    @limits.setter
    def limits(self, limits: BatchLimits) -> None:
        self._scheduler.limits = limits  # read afresh every iteration

    def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        return self._stream(lambda: self._prompts.encode_chat(messages), params, request_id)

    def generate_from_prompt(self, prompt: str, params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        return self._stream(lambda: self._prompts.encode_raw(prompt), params, request_id)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return len(self._prompts.encode_chat(messages))

    def abort(self, request_id: str) -> None:
        with self._live_lock:
            seq = self._live.get(request_id)
        if seq is not None:
            seq.cancelled = True

    def health(self) -> dict:
        return {
            "backend": "transformers",
            "model": self.model_name,
            "device": str(self._device),
            "dtype": str(self._model.dtype).removeprefix("torch."),
            "max_model_len": self.max_model_len,
            "chat_format": self._prompts.family,
            "generation_defaults": {"source": self.generation_defaults.source, **self.generation_defaults.values()},
            "rejected": self._rejected,
            **self._scheduler.health(),
        }

    def shutdown(self) -> None:
        self._scheduler.shutdown()

    async def _stream(self, encode, params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        # tokenizing a long prompt is real work: keep it off the event loop
        prompt_ids = await asyncio.to_thread(encode)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(len(prompt_ids), self.max_model_len)
        if self._scheduler.queued() >= self.limits.max_queue:
            self._rejected += 1
            raise EngineOverloadedError(
                f"the server is busy: {self.limits.max_queue} requests are already waiting; retry shortly"
            )
        seq = SequenceState(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=min(params.max_new_tokens, room),
            loop=asyncio.get_running_loop(),
            outbox=asyncio.Queue(),
            detokenizer=IncrementalDetokenizer(self._tokenizer, (*params.stop, *self._prompts.stop_strings)),
            generator=make_generator(params.seed, self._device),
        )
        with self._live_lock:
            if request_id in self._live:
                raise EngineError(f"request id {request_id!r} is already running")
            self._live[request_id] = seq
        self._scheduler.submit(seq)
        finished = False
        try:
            while True:
                item = await seq.outbox.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                # the consumer left (disconnect, cancellation): free the slot at the next step
                seq.cancelled = True
            with self._live_lock:
                self._live.pop(request_id, None)
