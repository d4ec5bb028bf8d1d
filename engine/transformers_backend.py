"""The default backend: a transformers model driven by one scheduler thread.

All model work happens on a single worker thread, so the event loop never
waits on torch. Requests are admitted at step boundaries and advanced one
token per step in turn, so a long answer does not hold back a new user, and a
cancelled request is dropped at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence

import torch

from engine.base import Engine
from engine.detokenizer import IncrementalDetokenizer
from engine.prompting import PromptBuilder
from engine.sampling import make_generator, sample_next_token
from engine.types import (
    ChatMessage,
    EngineError,
    GenerationChunk,
    PromptTooLongError,
    SamplingParams,
    Usage,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    """One request's state, owned by the worker thread once submitted."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator
    cache: object = None
    next_input: Optional[torch.Tensor] = None
    seen_ids: Optional[torch.Tensor] = None
    output_counts: Optional[torch.Tensor] = None  # only when presence/frequency penalties are on
    generated: int = 0
    cancelled: bool = field(default=False)


class TransformersEngine(Engine):
    def __init__(
        self,
        model,
        tokenizer,
        prompts: PromptBuilder,
        model_name: str,
        max_model_len: int,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._prompts = prompts
        self.model_name = model_name
        self.max_model_len = max_model_len
        self._device = next(model.parameters()).device
        self._inbox: "queue.Queue[_Sequence]" = queue.Queue()
        # request id -> sequence, for abort(); the worker reads `cancelled` flags
        self._live: dict[str, _Sequence] = {}
        self._live_lock = threading.Lock()
        self._active: list[_Sequence] = []
        self._stopping = threading.Event()
        self._stats = {"requests": 0, "tokens_generated": 0, "aborted": 0}
        self._worker = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._worker.start()

    # ---- the async side (event loop) -------------------------------------------------

    def generate(
        self, messages: Sequence[ChatMessage], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
        return self._stream(lambda: self._prompts.encode_chat(messages), params, request_id)

    def generate_from_prompt(
        self, prompt: str, params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationChunk]:
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
            "running": len(self._active),
            "waiting": self._inbox.qsize(),
            **self._stats,
        }

    def shutdown(self) -> None:
        self._stopping.set()
        self._worker.join(timeout=5)

    async def _stream(self, encode, params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        # tokenizing a long prompt is real work: keep it off the event loop
        prompt_ids = await asyncio.to_thread(encode)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(len(prompt_ids), self.max_model_len)
        loop = asyncio.get_running_loop()
        seq = _Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            params=params,
            max_new_tokens=min(params.max_new_tokens, room),
            loop=loop,
            outbox=asyncio.Queue(),
            detokenizer=IncrementalDetokenizer(self._tokenizer, (*params.stop, *self._prompts.stop_strings)),
            generator=make_generator(params.seed),
        )
        with self._live_lock:
            if request_id in self._live:
                raise EngineError(f"request id {request_id!r} is already running")
            self._live[request_id] = seq
        self._inbox.put(seq)
        finished = False
        try:
            while True:
                item = await seq.outbox.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                # the consumer left (disconnect, cancellation): free the slot
                seq.cancelled = True
            with self._live_lock:
                self._live.pop(request_id, None)

    # ---- the worker thread -----------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            self._admit(block=not self._active)
            self._drop_aborted()
            for seq in list(self._active):
                if seq.cancelled:
                    continue
                try:
                    self._step(seq)
                except Exception as exc:  # one bad request must not stop the others
                    log.exception("generation failed for %s", seq.request_id)
                    self._finish(seq, error=EngineError(f"generation failed: {exc}"))

    def _admit(self, block: bool) -> None:
        try:
            seq = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._active.append(seq)
            self._stats["requests"] += 1
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop_aborted(self) -> None:
        for seq in [s for s in self._active if s.cancelled]:
            self._active.remove(seq)
            seq.cache = None
            self._stats["aborted"] += 1
            log.info("request %s aborted after %d tokens", seq.request_id, seq.generated)

    @torch.inference_mode()
    def _step(self, seq: _Sequence) -> None:
        """Advance one sequence by one token (the first call also runs the prefill)."""
        from transformers import DynamicCache

        if seq.cache is None:
            seq.cache = DynamicCache()
            seq.next_input = torch.tensor([seq.prompt_ids], device=self._device)
            seq.seen_ids = torch.tensor(seq.prompt_ids, device=self._device)
        out = self._model(input_ids=seq.next_input, past_key_values=seq.cache, use_cache=True)
        logits = out.logits[0, -1]
        if seq.params.counts_output and seq.output_counts is None:
            seq.output_counts = torch.zeros(logits.shape[-1], device=logits.device)
        token = sample_next_token(logits, seq.params, seq.seen_ids, seq.generator, seq.output_counts)
        seq.generated += 1
        if seq.output_counts is not None:
            seq.output_counts[token] += 1
        self._stats["tokens_generated"] += 1
        if token in self._prompts.eos_token_ids:
            self._finish(seq, delta=seq.detokenizer.flush(), reason="stop")
            return
        delta = seq.detokenizer.push(token)
        if seq.detokenizer.stopped:
            self._finish(seq, delta=delta, reason="stop")
            return
        if seq.generated >= seq.max_new_tokens:
            self._finish(seq, delta=delta + seq.detokenizer.flush(), reason="length")
            return
        seq.next_input = torch.tensor([[token]], device=self._device)
        if seq.params.repetition_penalty != 1.0:
            seq.seen_ids = torch.cat([seq.seen_ids, seq.next_input[0]])
        if delta:
            self._emit(seq, GenerationChunk(delta=delta, usage=Usage(len(seq.prompt_ids), seq.generated)))

    def _finish(self, seq: _Sequence, delta: str = "", reason: str = "stop", error: Optional[BaseException] = None) -> None:
        if seq in self._active:
            self._active.remove(seq)
        seq.cache = None
        usage = Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=seq.generated)
        self._emit(seq, error if error is not None else GenerationChunk(delta=delta, finish_reason=reason, usage=usage))

    def _emit(self, seq: _Sequence, item) -> None:
        try:
            seq.loop.call_soon_threadsafe(seq.outbox.put_nowait, item)
        except RuntimeError:
            # the caller's event loop is gone: nobody is listening any more
            seq.cancelled = True
