"""The worker thread of the transformers backend: it schedules every request and runs every forward pass.

All model work happens here, so the event loop never waits on torch. Each
iteration spends at most `max_prefill_tokens` on prompts: waiting requests
whose prompt fits join together (one batched, left-padded prefill), and a
longer prompt is prefilled a chunk per iteration (chunked prefill). Every
running sequence advances one token per iteration (iteration-level
"continuous" batching); rows are grouped into batches of similar width, so
one long prompt does not pad every short row to its length. The iteration's
parts run as one forward pass where the model allows it (engine/step_parts.py),
and a newcomer that arrives during the first part of that pass joins it
(`_late_parts`). So a newcomer waits for at most one iteration, and a long prompt never
stalls the running streams for more than a chunk. Finished and cancelled
sequences leave their batch at the next step.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from typing import Optional, Sequence, Union

import torch

from engine.batch import RunningBatch, cache_of, prefill_inputs, row_kv
from engine.fused_forward import FusedForward, Group
from engine.kv_cache import GrowingCache
from engine.prefix_cache import NO_MATCH, PrefixCache, PrefixMatch
from engine.sequences import MAX_BATCHES, MIN_CHUNK_TOKENS, WIDTH_SLACK, BatchLimits, ChunkedPrompt, SequenceState
from engine.step_parts import Part, run_parts
from engine.tokens_out import accept, emit, sample_rows
from engine.types import EngineError

log = logging.getLogger(__name__)


class Scheduler:
    """Owns the waiting queue, the running batches and the prompt being read in chunks; runs on its own thread."""

    def __init__(self, model, fused: Optional[FusedForward], pad_id: int, eos_token_ids: Sequence[int],
                 limits: BatchLimits, prefixes: PrefixCache) -> None:
        self._model = model
        self._fused = fused
        self._pad_id = pad_id
        self._eos = frozenset(eos_token_ids)
        self.limits = limits
        self.prefixes = prefixes
        self._device = next(model.parameters()).device
        self._inbox: "queue.Queue[SequenceState]" = queue.Queue()
        self._waiting: collections.deque[SequenceState] = collections.deque()
        # rows of similar width share a batch: left padding makes a batch's every row as wide as its widest
        self._batches: list[RunningBatch] = []
        self._chunking: Optional[ChunkedPrompt] = None  # the long prompt being prefilled, one at a time
        # the pass in flight: newcomers it reads (not in a batch yet), the prompt tokens it spends, and
        # whether newcomers already joined it partway
        self._pass_joining: list[SequenceState] = []
        self._pass_prefill = 0
        self._pass_joined_late = False
        self._stopping = threading.Event()
        self.stats = {"requests": 0, "tokens_generated": 0, "aborted": 0, "steps": 0, "peak_batch": 0,
                      "prefill_tokens": 0, "failed": 0,
                      "joined_mid_pass": 0}
        self._worker = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._worker.start()

    # ---- read from any thread ----------------------------------------------------------

    def submit(self, seq: SequenceState) -> None:
        self._inbox.put(seq)

    def queued(self) -> int:
        """Requests not yet admitted (the prompt being read in chunks not counted)."""
        return self._inbox.qsize() + len(self._waiting)

    def health(self) -> dict:
        chunking = self._chunking
        return {
            "running": self.running,
            "batches": len(self._batches),
            "one_pass_steps": self._fused is not None,
            "waiting": self.queued() + (chunking is not None),
            "prefilling": None if chunking is None else {"done": chunking.done, "prompt_tokens": len(chunking.seq.prompt_ids)},
            "max_num_seqs": self.limits.max_num_seqs,
            "kv_cache_usage": round(self._kv_tokens() / max(1, self.limits.kv_cache_tokens), 4),
            **self.stats,
            "prefix_cache": self.prefixes.stats(),
        }

    @property
    def running(self) -> int:
        return sum(len(b) for b in list(self._batches))

    def _kv_tokens(self) -> int:
        """KV slots held: every slot of a batch (free ones too) is as wide as its widest row, plus a prompt being read."""
        held = sum(len(b.slots) * b.width for b in list(self._batches))
        chunking = self._chunking
        return held + (chunking.done if chunking is not None else 0)

    def shutdown(self) -> None:
        self._stopping.set()
        self._worker.join(timeout=5)

    # ---- the iteration -----------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        # every tensor the loop touches is made and changed in inference mode (the batches' masks included)
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._iteration()
                except Exception:  # a scheduler bug: the requests in flight fail, the thread keeps serving
                    log.exception("scheduler iteration failed; failing the requests in flight")
                    self._fail([s for b in self._batches for s in b.rows] + ([self._chunking.seq] if self._chunking else []))
                    self._batches, self._chunking = [], None

    def _iteration(self) -> None:
        self._collect(block=not self._batches and not self._waiting and self._chunking is None)
        self._drop_cancelled()
        try:
            run_parts(self._plan(), self._model, self._fused, self._late_parts)
        finally:
            self._pass_joining, self._pass_prefill, self._pass_joined_late = [], 0, False
        self._batches = [b for b in self._batches if b]

    def _plan(self) -> list[Part]:
        """This iteration's parts: every batch's decode step, then a chunk of the long prompt, then newcomers."""
        budget = self.limits.max_prefill_tokens
        joining = self._take_joiners(budget)
        parts = [self._decode_part(batch) for batch in self._batches]
        cost = self._prefill_cost(joining) if joining else 0
        if self._chunking is not None:
            chunk = max(budget - cost, MIN_CHUNK_TOKENS)
            parts.append(self._chunk_part(chunk))
            cost += chunk
        if joining:
            parts.append(self._prefill_part(joining))
        self._pass_joining, self._pass_prefill = list(joining), cost
        return parts

    def _late_parts(self, index: int, layers: int) -> list[Part]:
        """Asked between the layers of a one-pass step: newcomers that arrived while it runs join it.

        A request arriving while the rows decode used to wait for the pass in
        flight to end, then be read in the next one: ~1.5 passes. Joining
        before layer `index` costs a pass over the first `index` layers for
        its prompt alone, which the decoding rows wait for, so it is done
        only before the first `join_mid_pass` of the layers, once per pass,
        and while the pass decodes at most half of `max_num_seqs` rows. Past
        that a pass is long and arrivals frequent: the catch-ups cost ~3% of
        the throughput at 32 rows and did not shorten the wait there
        (bench/README.md, "Round 8"). Other arrivals join the next pass.
        """
        if self._pass_joined_late or index > layers * self.limits.join_mid_pass or self._inbox.empty() or \
                self.running > self.limits.max_num_seqs // 2:
            return []
        self._collect(block=False)
        self._drop_cancelled_waiting()
        joining = self._take_joiners(self.limits.max_prefill_tokens - self._pass_prefill, may_chunk=False)
        if not joining:
            return []
        try:
            part = self._prefill_part(joining)
        except Exception:  # they left the queue: fail them rather than lose them; the pass goes on
            log.exception("could not prepare %d prompts to join the pass", len(joining))
            self._fail(joining)
            return []
        self._pass_joining += joining
        self._pass_prefill += self._prefill_cost(joining)
        self._pass_joined_late = True
        self.stats["joined_mid_pass"] += len(joining)
        return [part]

    def _decode_part(self, batch: RunningBatch) -> Part:
        try:
            batch.tidy()
        except Exception as exc:  # only a saving: the batch is unchanged, its free slots ride along
            log.warning("could not compact a batch of %d rows: %r", len(batch), exc)
        live, rows = batch.live(), batch.rows
        inputs = batch.step_inputs([s.last_token if s is not None else self._pad_id for s in batch.slots])
        # free slots are computed too (cheaper than a copy to drop them); their logits are not sampled
        pick = None if len(live) == len(batch.slots) else torch.tensor(live, device=self._device)

        def done(logits: torch.Tensor) -> None:
            self._finish_step(batch, sample_rows(logits if pick is None else logits.index_select(0, pick), rows))

        def failed(exc: Exception) -> None:
            # a forward pass cannot be split by row: fail the batch, keep serving
            log.error("decode step failed for %d requests", len(rows), exc_info=exc)
            self._fail(rows)
            batch.clear()

        return Part(Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], batch.cache), done, failed)

    def _chunk_part(self, tokens: int) -> Part:
        """The next `tokens` of the long prompt; after the last chunk, its first token is sampled and it joins."""
        state = self._chunking
        seq = state.seq
        start, end = state.done, min(len(seq.prompt_ids), state.done + tokens)
        mask = torch.ones((1, end), dtype=torch.long, device=self._device)
        group = Group(torch.tensor([seq.prompt_ids[start:end]], device=self._device), mask,
                      torch.arange(start, end, device=self._device).unsqueeze(0), state.cache)

        def done(logits: torch.Tensor) -> None:
            state.done = end
            self.stats["prefill_tokens"] += end - start
            if end == len(seq.prompt_ids):
                self._chunking = None
                self._join([seq], logits, state.cache, mask, [seq.prefix])

        def failed(exc: Exception) -> None:
            log.error("prefill failed for request %s", seq.request_id, exc_info=exc)
            self._chunking = None
            self._fail([seq])

        return Part(group, done, failed)

    def _prefill_part(self, joining: list[SequenceState]) -> Part:
        """The newcomers' prompts read together; if that pass fails, one by one, so only one that fails alone fails."""
        for seq in joining:
            seq.mark_scheduled()
        prefixes = [s.prefix if s.prefix is not None else self._cached_start(s) for s in joining]
        inputs = prefill_inputs([s.prompt_ids for s in joining], self._pad_id, self._device, prefixes)
        cache = inputs.pop("past_key_values", None)
        if cache is None:
            cache = GrowingCache()

        def done(logits: torch.Tensor) -> None:
            self.stats["prefill_tokens"] += sum(len(s.prompt_ids) - m.tokens for s, m in zip(joining, prefixes))
            self._join(joining, logits, cache, inputs["attention_mask"], prefixes)

        def failed(exc: Exception) -> None:
            log.error("prefill failed for request %s", ", ".join(s.request_id for s in joining), exc_info=exc)
            self._fail(joining)

        retry = (lambda: [self._prefill_part([seq]) for seq in joining]) if len(joining) > 1 else None
        return Part(Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], cache), done, failed, retry)

    def _prefill_cost(self, joining: list[SequenceState]) -> int:
        """Prompt tokens a joint prefill computes, padding included: what it takes from the iteration's budget."""
        return max(self._fresh_tokens(s) for s in joining) * len(joining)

    # ---- admission -----------------------------------------------------------------------

    def _collect(self, block: bool) -> None:
        try:
            seq = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._waiting.append(seq)
            self.stats["requests"] += 1
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled_waiting(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self.stats["aborted"] += 1

    def _drop_cancelled(self) -> None:
        """Cancelled requests leave the queue, the chunked prompt and their batches (between passes only:
        a pass in flight uses the batches' rows; `_late_parts` drops from the queue alone)."""
        self._drop_cancelled_waiting()
        if self._chunking is not None and self._chunking.seq.cancelled:
            log.info("request %s aborted while its prompt was read", self._chunking.seq.request_id)
            self._chunking = None
            self.stats["aborted"] += 1
        for batch in self._batches:
            gone = [i for i, s in enumerate(batch.slots) if s is not None and s.cancelled]
            for i in gone:
                seq = batch.slots[i]
                self.stats["aborted"] += 1
                log.info("request %s aborted after %d tokens", seq.request_id, seq.generated)
            batch.release(gone)
        self._batches = [b for b in self._batches if b]

    def _fresh_tokens(self, seq: SequenceState) -> int:
        """Prompt tokens the model must read for `seq` (those not found in the prefix cache)."""
        if seq.prefix is None:
            seq.prefix = self._cached_start(seq)
        return len(seq.prompt_ids) - seq.prefix.tokens

    def _cached_start(self, seq: SequenceState) -> PrefixMatch:
        """The KV of `seq`'s prompt start in the prefix cache; none for a seeded request, which must repeat its
        text: a prompt read partly from the cache is computed in another shape, and the logits' last bits
        change a draw from a wide distribution (1 of 12 seeded answers at temperature 1.2 differed, 0 of 12
        with the prompt read whole)."""
        return NO_MATCH if seq.params.seed is not None else self.prefixes.lookup(seq.prompt_ids)

    def _take_joiners(self, budget: int, may_chunk: bool = True) -> list[SequenceState]:
        """Waiting requests that fit the batch, the KV budget and this iteration's prefill budget.

        FIFO, except that a prompt longer than the budget is moved to chunked
        prefill (one at a time, and only `may_chunk`) and the short prompts behind it go ahead.
        """
        joining: list[SequenceState] = []
        in_flight = [s for b in self._batches for s in b.rows] + ([self._chunking.seq] if self._chunking else []) + \
            self._pass_joining
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
                if self._chunking is None and may_chunk:
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
            log.debug("admitting %d requests (%s; %d prefill tokens)", len(joining),
                      " ".join(s.request_id for s in joining), widest * len(joining))
        return joining

    def _start_chunked(self, seq: SequenceState) -> None:
        seq.mark_scheduled()
        match = seq.prefix
        cache = cache_of(match.kv) if match.kv is not None else GrowingCache()
        self._chunking = ChunkedPrompt(seq, cache, match.tokens)
        log.debug("request %s: %d prompt tokens to read in chunks", seq.request_id, len(seq.prompt_ids) - match.tokens)

    def _join(self, joining: list[SequenceState], logits: torch.Tensor, cache, mask: torch.Tensor,
              prefixes: Sequence[PrefixMatch]) -> None:
        """Prompts fully read: keep their KV for reuse, sample each first token, merge them into a batch."""
        if self.prefixes.enabled:
            # requests arriving meanwhile share these prompts' beginnings (the system prompt at least)
            for i, (seq, match) in enumerate(zip(joining, prefixes)):
                if match.tokens < len(seq.prompt_ids) - 1:
                    self.prefixes.store(seq.prompt_ids, lambda i=i: row_kv(cache, mask, i))
        for seq in joining:
            seq.prefix = None  # the cached tensors are not needed any more
            if seq.params.repetition_penalty != 1.0:
                seq.seen_ids = torch.tensor(seq.prompt_ids, device=self._device)
        tokens = sample_rows(logits, joining)
        fresh = RunningBatch()
        fresh.add(joining, cache, mask)
        self._finish_step(fresh, tokens)
        if fresh:
            self._place(fresh)
            self.stats["peak_batch"] = max(self.stats["peak_batch"], self.running)

    def _place(self, fresh: RunningBatch) -> None:
        """Merge newly prefilled rows into a running batch of similar width, or start a batch of their own.

        One 2,000-token prompt merged into eight short rows would make all nine
        2,000 wide: every step would copy and attend over the padding, and the
        merge itself moves every row's KV (measured: joining took 4.2 s, then
        0.36 s a step instead of 0.09). A separate batch costs its own
        attention (and its own forward pass where steps are not one pass),
        which is far less.
        """
        live = [b for b in self._batches if b]
        width = fresh.width
        fits = [b for b in live if max(b.width, width) <= 2 * min(b.width, width) + WIDTH_SLACK]
        if not fits and len(live) >= MAX_BATCHES:
            fits = [min(live, key=lambda b: max(b.width, width) * (len(b) + len(fresh)))]
        if fits:
            # free slots that fit take the rows without a copy of the batch
            fits.sort(key=lambda b: not b.can_fill(len(fresh), width))
            fits[0].add(fresh.slots, fresh.cache, fresh.mask)
        else:
            self._batches.append(fresh)

    # ---- tokens out ------------------------------------------------------------------------

    def _finish_step(self, batch: RunningBatch, tokens: Sequence[Union[int, Exception]]) -> None:
        """Hand each row of `batch` its token; drop the rows that ended or failed."""
        live = batch.live()
        assert len(tokens) == len(live)
        self.stats["steps"] += 1
        ended, failed = [], []
        for i, token in zip(live, tokens):
            seq = batch.slots[i]
            try:
                if isinstance(token, Exception):
                    raise token
                self.stats["tokens_generated"] += 1
                last = accept(seq, token, self._eos)
            except Exception as exc:  # this request alone: its neighbours in the batch go on
                log.warning("request %s failed: %r", seq.request_id, exc)
                failed.append(i)
                continue
            if last is None:
                continue
            ended.append((i, last))
            if self.prefixes.enabled:
                # a conversation's next prompt starts with this prompt and answer
                # (the last token was sampled but never fed, so it has no KV yet)
                self.prefixes.store(seq.prompt_ids + seq.output_ids[:-1], lambda i=i: row_kv(batch.cache, batch.mask, i))
        gone = {i: batch.slots[i] for i in failed + [i for i, _ in ended]}
        batch.release(list(gone))
        # the rows leave the batch before their callers hear the end, so a caller that reads the
        # running count right after its answer no longer finds itself in it
        self._fail([gone[i] for i in failed])
        for i, last in ended:
            emit(gone[i], last)

    def _fail(self, rows: Sequence[SequenceState]) -> None:
        for seq in rows:
            self.stats["failed"] += 1
            # the details are in the log; the client gets a sentence without internals
            emit(seq, EngineError("generation failed for this request; other requests are not affected"))
