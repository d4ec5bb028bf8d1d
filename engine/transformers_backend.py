"""The default backend: a transformers model driven by one scheduler thread, batching every user.

All model work happens on a single worker thread, so the event loop never
waits on torch. Each iteration spends at most `max_prefill_tokens` on
prompts: waiting requests whose prompt fits join together (one batched,
left-padded prefill), and a longer prompt is prefilled a chunk per iteration
(chunked prefill). Then one decode step runs for every running sequence,
one forward pass per batch (iteration-level "continuous" batching); rows
are grouped into batches of similar width, so one long prompt does not pad
every short row to its length. So a newcomer waits for at most one
iteration, and a long prompt never stalls the running streams for more than
a chunk. Finished and cancelled sequences leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from typing import AsyncIterator, Optional, Sequence, Union

import torch

from engine.base import Engine
from engine.batch import RunningBatch, cache_of, prefill_inputs, row_kv
from engine.detokenizer import IncrementalDetokenizer
from engine.fused_forward import FusedForward, Group, fusable, rollback
from engine.generation_defaults import GenerationDefaults
from engine.kv_cache import GrowingCache
from engine.prefix_cache import PrefixCache, PrefixMatch
from engine.prompting import PromptBuilder
from engine.sampling import make_generator, sample_batch
from engine.sequences import MAX_BATCHES, MIN_CHUNK_TOKENS, WIDTH_SLACK, BatchLimits, ChunkedPrompt, SequenceState
from engine.types import (
    ChatMessage,
    EngineError,
    EngineOverloadedError,
    GenerationChunk,
    PromptTooLongError,
    SamplingParams,
    Usage,
)

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    def __init__(self, model, tokenizer, prompts: PromptBuilder, model_name: str, max_model_len: int,
                 limits: BatchLimits = BatchLimits(), prefix_cache: Optional[PrefixCache] = None,
                 generation_defaults: GenerationDefaults = GenerationDefaults(), fused_step: bool = True) -> None:
        self._model = model
        self._fused = FusedForward(model) if fused_step and fusable(model) else None
        self._tokenizer = tokenizer
        self._prompts = prompts
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.limits = limits
        self.generation_defaults = generation_defaults
        self._prefixes = prefix_cache if prefix_cache is not None else PrefixCache(0)
        self._device = next(model.parameters()).device
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._inbox: "queue.Queue[SequenceState]" = queue.Queue()
        self._waiting: collections.deque[SequenceState] = collections.deque()
        # rows of similar width share a batch: left padding makes a batch's every row as wide as its widest
        self._batches: list[RunningBatch] = []
        self._chunking: Optional[ChunkedPrompt] = None  # the long prompt being prefilled, one at a time
        # request id -> sequence, for abort(); the worker reads `cancelled` flags
        self._live: dict[str, SequenceState] = {}
        self._live_lock = threading.Lock()
        self._stopping = threading.Event()
        self._stats = {"requests": 0, "tokens_generated": 0, "aborted": 0, "rejected": 0, "steps": 0, "peak_batch": 0,
                       "prefill_tokens": 0, "failed": 0}
        self._worker = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._worker.start()

    # ---- the async side (event loop) -------------------------------------------------

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
            "running": self._running,
            "batches": len(self._batches),
            "one_pass_steps": self._fused is not None,
            "waiting": self._inbox.qsize() + len(self._waiting) + (self._chunking is not None),
            "prefilling": None if self._chunking is None else {
                "done": self._chunking.done, "prompt_tokens": len(self._chunking.seq.prompt_ids)},
            "max_num_seqs": self.limits.max_num_seqs,
            "kv_cache_usage": round(self._kv_tokens() / max(1, self.limits.kv_cache_tokens), 4),
            "generation_defaults": {"source": self.generation_defaults.source, **self.generation_defaults.values()},
            **self._stats,
            "prefix_cache": self._prefixes.stats(),
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
        if self._inbox.qsize() + len(self._waiting) >= self.limits.max_queue:
            self._stats["rejected"] += 1
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
        self._inbox.put(seq)
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

    # ---- the worker thread -----------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            self._collect(block=not self._batches and not self._waiting and self._chunking is None)
            self._drop_cancelled()
            budget = self.limits.max_prefill_tokens
            joining = self._take_joiners(budget)
            if self._fused is not None and self._one_pass(joining, budget):
                continue
            if joining:
                budget -= self._admit(joining)
            if self._chunking is not None:
                self._advance_chunk(max(budget, MIN_CHUNK_TOKENS))
            for batch in list(self._batches):
                try:
                    self._decode_step(batch)
                except Exception:  # a forward pass cannot be split by row: fail the batch, keep serving
                    log.exception("decode step failed")
                    self._fail(batch.rows)
                    batch.keep([])
            self._batches = [b for b in self._batches if b]

    @torch.inference_mode()
    def _one_pass(self, joining: list[SequenceState], budget: int) -> bool:
        """This iteration's work as one forward pass (engine/fused_forward.py). False: nothing was done, and
        the caller does it pass by pass (the pass failed, so each part runs alone and only its rows can fail)."""
        groups: list[Group] = []
        steps = []  # (batch, mask before this step, KV filled per layer before it)
        for batch in self._batches:
            before = (batch.mask, [layer.get_seq_length() for layer in batch.cache.layers])
            inputs = batch.step_inputs([s.last_token for s in batch.rows])
            groups.append(Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], batch.cache))
            steps.append((batch, *before))
        chunk = self._chunking
        if chunk is not None:
            seq = chunk.seq
            cost = self._prefill_cost(joining) if joining else 0
            start = chunk.done
            end = min(len(seq.prompt_ids), start + max(budget - cost, MIN_CHUNK_TOKENS))
            chunk_filled = [layer.get_seq_length() for layer in chunk.cache.layers]
            groups.append(Group(torch.tensor([seq.prompt_ids[start:end]], device=self._device),
                                torch.ones((1, end), dtype=torch.long, device=self._device),
                                torch.arange(start, end, device=self._device).unsqueeze(0), chunk.cache))
        if joining:
            for seq in joining:
                seq.mark_scheduled()
            prefixes = [s.prefix if s.prefix is not None else self._prefixes.lookup(s.prompt_ids) for s in joining]
            inputs = prefill_inputs([s.prompt_ids for s in joining], self._pad_id, self._device, prefixes)
            fresh_cache = inputs.pop("past_key_values", None) or GrowingCache()
            groups.append(Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], fresh_cache))
        if not groups:
            return False
        try:
            logits = self._fused(groups)
        except Exception as exc:
            log.warning("one-pass step failed (%r); running its parts one by one", exc)
            for batch, mask, filled in steps:
                batch.mask = mask
                rollback(batch.cache, filled)
            if chunk is not None:
                rollback(chunk.cache, chunk_filled)
            return False
        # decode results first: a newcomer placed into a batch changes that batch's rows
        for (batch, _, _), batch_logits in zip(steps, logits):
            self._finish_step(batch, self._sample(batch_logits, batch.rows))
        self._batches = [b for b in self._batches if b]
        rest = logits[len(steps):]
        if chunk is not None:
            chunk_logits, rest = rest[0], rest[1:]
            chunk.done = end
            self._stats["prefill_tokens"] += end - start
            if end == len(chunk.seq.prompt_ids):
                self._chunking = None
                self._join([chunk.seq], chunk_logits, chunk.cache,
                           torch.ones((1, end), dtype=torch.long, device=self._device), [chunk.seq.prefix])
        if joining:
            self._stats["prefill_tokens"] += sum(len(s.prompt_ids) - m.tokens for s, m in zip(joining, prefixes))
            self._join(joining, rest[0], fresh_cache, inputs["attention_mask"], prefixes)
        return True

    def _kv_tokens(self) -> int:
        """KV slots held: every row of a batch is as wide as its widest (left padding), plus a prompt being read."""
        held = sum(len(b) * b.width for b in list(self._batches))
        chunking = self._chunking
        return held + (chunking.done if chunking is not None else 0)

    @property
    def _running(self) -> int:
        return sum(len(b) for b in self._batches)

    def _admit(self, joining: list[SequenceState]) -> int:
        """Prefill the joiners together; if that fails, one by one, so only a request that fails alone is failed.

        Returns the prompt tokens computed (padding included), taken from this iteration's budget.
        """
        cost = self._prefill_cost(joining)
        try:
            self._prefill(joining)
            return cost
        except Exception as exc:
            if len(joining) == 1:
                log.exception("prefill failed for request %s", joining[0].request_id)
                self._fail(joining)
                return cost
            log.warning("batched prefill of %d requests failed (%s); prefilling them one by one", len(joining), exc)
        for seq in joining:
            try:
                self._prefill([seq])
            except Exception:
                log.exception("prefill failed for request %s", seq.request_id)
                self._fail([seq])
        return cost

    def _prefill_cost(self, joining: list[SequenceState]) -> int:
        """Prompt tokens a joint prefill computes, padding included: what it takes from the iteration's budget."""
        return max(self._fresh_tokens(s) for s in joining) * len(joining)

    def _fail(self, rows: Sequence[SequenceState]) -> None:
        for seq in rows:
            self._stats["failed"] += 1
            # the details are in the log; the client gets a sentence without internals
            self._emit(seq, EngineError("generation failed for this request; other requests are not affected"))

    def _collect(self, block: bool) -> None:
        try:
            seq = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._waiting.append(seq)
            self._stats["requests"] += 1
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._stats["aborted"] += 1
        if self._chunking is not None and self._chunking.seq.cancelled:
            log.info("request %s aborted while its prompt was read", self._chunking.seq.request_id)
            self._chunking = None
            self._stats["aborted"] += 1
        for batch in self._batches:
            gone = [i for i, s in enumerate(batch.rows) if s.cancelled]
            for i in gone:
                seq = batch.rows[i]
                self._stats["aborted"] += 1
                log.info("request %s aborted after %d tokens", seq.request_id, seq.generated)
            if gone:
                batch.keep([i for i in range(len(batch)) if i not in gone])
        self._batches = [b for b in self._batches if b]

    def _fresh_tokens(self, seq: SequenceState) -> int:
        """Prompt tokens the model must read for `seq` (those not found in the prefix cache)."""
        if seq.prefix is None:
            seq.prefix = self._prefixes.lookup(seq.prompt_ids)
        return len(seq.prompt_ids) - seq.prefix.tokens

    def _take_joiners(self, budget: int) -> list[SequenceState]:
        """Waiting requests that fit the batch, the KV budget and this iteration's prefill budget.

        FIFO, except that a prompt longer than the budget is moved to chunked
        prefill (one at a time) and the short prompts behind it go ahead.
        """
        joining: list[SequenceState] = []
        in_flight = [s for b in self._batches for s in b.rows] + ([self._chunking.seq] if self._chunking else [])
        rows = len(in_flight)
        longest = max((s.reserved_tokens for s in in_flight), default=0)
        widest = 0
        for seq in list(self._waiting):
            if rows >= self.limits.max_num_seqs:
                break
            new_longest = max(longest, seq.reserved_tokens)
            # left padding makes every row as wide as the widest: budget the padded size
            if (rows + 1) * new_longest > self.limits.kv_cache_tokens and rows > 0:
                break
            fresh = self._fresh_tokens(seq)
            if fresh > budget:
                if self._chunking is None:
                    self._waiting.remove(seq)
                    self._start_chunked(seq)
                    rows, longest = rows + 1, new_longest
                continue
            if joining and max(widest, fresh) * (len(joining) + 1) > budget:
                break
            self._waiting.remove(seq)
            joining.append(seq)
            rows, longest, widest = rows + 1, new_longest, max(widest, fresh)
        if joining:
            log.debug("admitting %d requests (%d prefill tokens)", len(joining), widest * len(joining))
        return joining

    def _start_chunked(self, seq: SequenceState) -> None:
        seq.mark_scheduled()
        match = seq.prefix
        cache = cache_of(match.kv) if match.kv is not None else GrowingCache()
        self._chunking = ChunkedPrompt(seq, cache, match.tokens)
        log.debug("request %s: %d prompt tokens to read in chunks", seq.request_id, len(seq.prompt_ids) - match.tokens)

    @torch.inference_mode()
    def _advance_chunk(self, tokens: int) -> None:
        """Read the next `tokens` of the long prompt; after the last chunk, sample its first token and join."""
        state = self._chunking
        seq = state.seq
        start, end = state.done, min(len(seq.prompt_ids), state.done + tokens)
        try:
            out = self._model(
                input_ids=torch.tensor([seq.prompt_ids[start:end]], device=self._device),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=self._device),
                position_ids=torch.arange(start, end, device=self._device).unsqueeze(0),
                past_key_values=state.cache, use_cache=True, logits_to_keep=1,
            )
        except Exception:
            log.exception("prefill failed for request %s", seq.request_id)
            self._chunking = None
            self._fail([seq])
            return
        state.done = end
        self._stats["prefill_tokens"] += end - start
        if end < len(seq.prompt_ids):
            return
        self._chunking = None
        mask = torch.ones((1, end), dtype=torch.long, device=self._device)
        self._join([seq], out.logits[:, -1], state.cache, mask, [seq.prefix])

    @torch.inference_mode()
    def _prefill(self, joining: list[SequenceState]) -> None:
        for seq in joining:
            seq.mark_scheduled()
        prefixes = [s.prefix if s.prefix is not None else self._prefixes.lookup(s.prompt_ids) for s in joining]
        inputs = prefill_inputs([s.prompt_ids for s in joining], self._pad_id, self._device, prefixes)
        cache = inputs.pop("past_key_values", None)
        if cache is None:
            cache = GrowingCache()
        # only the last position's logits are needed: skip the vocabulary projection for the rest
        out = self._model(**inputs, past_key_values=cache, logits_to_keep=1)
        self._stats["prefill_tokens"] += sum(len(s.prompt_ids) - m.tokens for s, m in zip(joining, prefixes))
        self._join(joining, out.logits[:, -1], cache, inputs["attention_mask"], prefixes)

    def _join(self, joining: list[SequenceState], logits: torch.Tensor, cache, mask: torch.Tensor,
              prefixes: Sequence[PrefixMatch]) -> None:
        """Prompts fully read: keep their KV for reuse, sample each first token, merge them into the batch."""
        if self._prefixes.enabled:
            # requests arriving meanwhile share these prompts' beginnings (the system prompt at least)
            for i, (seq, match) in enumerate(zip(joining, prefixes)):
                if match.tokens < len(seq.prompt_ids) - 1:
                    self._prefixes.store(seq.prompt_ids, lambda i=i: row_kv(cache, mask, i))
        for seq in joining:
            seq.prefix = None  # the cached tensors are not needed any more
            if seq.params.repetition_penalty != 1.0:
                seq.seen_ids = torch.tensor(seq.prompt_ids, device=self._device)
        tokens = self._sample(logits, joining)
        fresh = RunningBatch()
        fresh.add(joining, cache, mask)
        self._finish_step(fresh, tokens)
        if fresh:
            self._place(fresh)
            self._stats["peak_batch"] = max(self._stats["peak_batch"], self._running)

    def _place(self, fresh: RunningBatch) -> None:
        """Merge newly prefilled rows into a running batch of similar width, or start a batch of their own.

        One 2,000-token prompt merged into eight short rows would make all nine
        2,000 wide: every step would copy and attend over the padding, and the
        merge itself moves every row's KV (measured: joining took 4.2 s, then
        0.36 s a step instead of 0.09). A separate batch costs one more forward
        pass per step, which is far less.
        """
        width = fresh.width
        fits = [b for b in self._batches if max(b.width, width) <= 2 * min(b.width, width) + WIDTH_SLACK]
        if not fits and len(self._batches) >= MAX_BATCHES:
            fits = [min(self._batches, key=lambda b: max(b.width, width) * (len(b) + len(fresh)))]
        if fits:
            fits[0].add(fresh.rows, fresh.cache, fresh.mask)
        else:
            self._batches.append(fresh)

    @torch.inference_mode()
    def _decode_step(self, batch: RunningBatch) -> None:
        rows = batch.rows
        out = self._model(**batch.step_inputs([s.last_token for s in rows]))
        self._finish_step(batch, self._sample(out.logits[:, -1], rows))

    def _sample(self, logits: torch.Tensor, rows: Sequence[SequenceState]) -> list[Union[int, Exception]]:
        for seq in rows:
            if seq.params.counts_output and seq.output_counts is None:
                seq.output_counts = torch.zeros(logits.shape[-1], device=logits.device)
        return sample_batch(
            logits, [s.params for s in rows], [s.generator for s in rows],
            [s.seen_ids for s in rows], [s.output_counts for s in rows],
        )

    def _finish_step(self, batch: RunningBatch, tokens: Sequence[Union[int, Exception]]) -> None:
        """Hand each row of `batch` its token; drop the rows that ended or failed."""
        assert len(tokens) == len(batch)
        self._stats["steps"] += 1
        keep, ended, failed = [], [], []
        for i, (seq, token) in enumerate(zip(batch.rows, tokens)):
            try:
                if isinstance(token, Exception):
                    raise token
                last = self._accept(seq, token)
            except Exception as exc:  # this request alone: its neighbours in the batch go on
                log.warning("request %s failed: %r", seq.request_id, exc)
                failed.append(seq)
                continue
            if last is None:
                keep.append(i)
                continue
            ended.append((seq, last))
            if self._prefixes.enabled:
                # a conversation's next prompt starts with this prompt and answer
                # (the last token was sampled but never fed, so it has no KV yet)
                self._prefixes.store(seq.prompt_ids + seq.output_ids[:-1], lambda i=i: row_kv(batch.cache, batch.mask, i))
        batch.keep(keep)
        # the rows leave the batch before their callers hear the end, so a caller that reads the
        # running count right after its answer no longer finds itself in it
        self._fail(failed)
        for seq, last in ended:
            self._emit(seq, last)

    def _accept(self, seq: SequenceState, token: int) -> Optional[GenerationChunk]:
        """Record one generated token; returns the final chunk, not yet sent, when the sequence is finished."""
        seq.output_ids.append(token)
        self._stats["tokens_generated"] += 1
        if seq.output_counts is not None:
            seq.output_counts[token] += 1
        if seq.seen_ids is not None:
            seq.seen_ids = torch.cat([seq.seen_ids, torch.tensor([token], device=seq.seen_ids.device)])
        usage = Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=seq.generated)
        if token in self._prompts.eos_token_ids and not seq.params.ignore_eos:
            return GenerationChunk(delta=seq.detokenizer.flush(), finish_reason="stop", usage=usage)
        delta = seq.detokenizer.push(token)
        if seq.detokenizer.stopped:
            return GenerationChunk(delta=delta, finish_reason="stop", usage=usage)
        if seq.generated >= seq.max_new_tokens:
            return GenerationChunk(delta=delta + seq.detokenizer.flush(), finish_reason="length", usage=usage)
        if delta:
            self._emit(seq, GenerationChunk(delta=delta, usage=usage))
        return None

    def _emit(self, seq: SequenceState, item) -> None:
        if isinstance(item, GenerationChunk) and item.finish_reason is not None:
            item.queue_s = seq.queue_s
        try:
            seq.loop.call_soon_threadsafe(seq.outbox.put_nowait, item)
        except RuntimeError:
            # the caller's event loop is gone: nobody is listening any more
            seq.cancelled = True

