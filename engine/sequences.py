"""What the scheduler keeps per request and per long prompt, and the limits it schedules by."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import GrowingCache
from engine.prefix_cache import PrefixMatch
from engine.types import SamplingParams


@dataclass(frozen=True)
class BatchLimits:
    max_num_seqs: int = 32
    kv_cache_tokens: int = 131072
    max_prefill_tokens: int = 64
    max_queue: int = 256
    #: a newcomer may join a one-pass step in flight before this fraction of its layers (engine/scheduler.py)
    join_mid_pass: float = 0.5


#: a long prompt advances at least this much per iteration, even when newcomers took the budget
MIN_CHUNK_TOKENS = 32
#: rows join a batch whose width is within 2x (+ this many columns) of theirs
WIDTH_SLACK = 128
#: at most this many batches (one forward pass each per step); past it rows join the closest
MAX_BATCHES = 4


@dataclass(eq=False)
class ChunkedPrompt:
    """A prompt too long for one iteration: its KV so far, and how many prompt tokens that covers."""

    seq: "SequenceState"
    cache: GrowingCache  # this one row's KV, no padding
    done: int


@dataclass(eq=False)
class SequenceState:
    """One request's state, owned by the worker thread once submitted."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator
    seen_ids: Optional[torch.Tensor] = None  # prompt + answer, for repetition_penalty
    output_counts: Optional[torch.Tensor] = None  # answer token counts, for presence/frequency penalties
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    prefix: Optional[PrefixMatch] = None  # cached KV of the prompt's start, looked up when it is scheduled
    submitted_at: float = field(default_factory=time.monotonic)
    queue_s: Optional[float] = None  # submitted until its prompt began to be read

    def mark_scheduled(self) -> None:
        """Its prompt begins to be read: the end of its queue time (a chunked prompt's first chunk)."""
        if self.queue_s is None:
            self.queue_s = time.monotonic() - self.submitted_at

    @property
    def generated(self) -> int:
        return len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens
