"""What becomes of the scheduler's logits: a token per row, recorded on its request, and chunks handed to
the request's event loop. Runs on the scheduler's worker thread; holds no state of its own."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from engine.sampling import sample_batch
from engine.sequences import SequenceState
from engine.types import GenerationChunk, Usage


def sample_rows(logits: torch.Tensor, rows: Sequence[SequenceState]) -> list[Union[int, Exception]]:
    """One token per row of `logits` [B, V], each with its request's settings and generator; a row that
    cannot be sampled gets its exception instead (sample_batch)."""
    for seq in rows:
        if seq.params.counts_output and seq.output_counts is None:
            seq.output_counts = torch.zeros(logits.shape[-1], device=logits.device)
    return sample_batch(
        logits, [s.params for s in rows], [s.generator for s in rows],
        [s.seen_ids for s in rows], [s.output_counts for s in rows],
    )


def accept(seq: SequenceState, token: int, eos: frozenset) -> Optional[GenerationChunk]:
    """Record one generated token and send its text; returns the final chunk, not yet sent, when the
    sequence is finished."""
    seq.output_ids.append(token)
    if seq.output_counts is not None:
        seq.output_counts[token] += 1
    if seq.seen_ids is not None:
        seq.seen_ids = torch.cat([seq.seen_ids, torch.tensor([token], device=seq.seen_ids.device)])
    usage = Usage(prompt_tokens=len(seq.prompt_ids), completion_tokens=seq.generated)
    if token in eos and not seq.params.ignore_eos:
        return GenerationChunk(delta=seq.detokenizer.flush(), finish_reason="stop", usage=usage)
    delta = seq.detokenizer.push(token)
    if seq.detokenizer.stopped:
        return GenerationChunk(delta=delta, finish_reason="stop", usage=usage)
    if seq.generated >= seq.max_new_tokens:
        return GenerationChunk(delta=delta + seq.detokenizer.flush(), finish_reason="length", usage=usage)
    if delta:
        emit(seq, GenerationChunk(delta=delta, usage=usage))
    return None


def emit(seq: SequenceState, item) -> None:
    """Hand a chunk or an error to the request's event loop (thread-safe)."""
    if isinstance(item, GenerationChunk) and item.finish_reason is not None:
        item.queue_s = seq.queue_s
    try:
        seq.loop.call_soon_threadsafe(seq.outbox.put_nowait, item)
    except RuntimeError:
        # the caller's event loop is gone: nobody is listening any more
        seq.cancelled = True
