"""Turning one row of logits into the next token, per request's own settings."""

from __future__ import annotations

from typing import Optional

import torch

from engine.types import SamplingParams


def make_generator(seed: Optional[int]) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL-style penalty, as transformers applies it: shrink the logits of seen tokens."""
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits
    scores = logits.gather(-1, seen_ids)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen_ids, scores)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, output_counts: Optional[torch.Tensor], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: subtract per generated occurrence (frequency) and once per seen token (presence)."""
    if output_counts is None or (presence == 0.0 and frequency == 0.0):
        return logits
    return logits - frequency * output_counts - presence * (output_counts > 0).to(logits.dtype)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask everything outside the top-k and the top-p nucleus with -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # keep a token while the mass before it is below top_p: the first token always stays
        remove_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    params: SamplingParams,
    seen_ids: torch.Tensor,
    generator: torch.Generator,
    output_counts: Optional[torch.Tensor] = None,
) -> int:
    """Pick the next token from a 1-D row of logits."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, params.repetition_penalty)
    logits = apply_presence_frequency_penalty(logits, output_counts, params.presence_penalty, params.frequency_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
