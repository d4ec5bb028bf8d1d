"""Turning a batch of logits rows into next tokens, each row with its own request's settings."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from engine.types import SamplingParams


def make_generator(seed: Optional[int]) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty, as transformers applies it: shrink the logits of seen tokens (one row)."""
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


def _mask_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """On rows sorted best-first: True where a token falls outside top-k or the top-p nucleus."""
    width = sorted_logits.shape[-1]
    rank = torch.arange(width, device=sorted_logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, width)).unsqueeze(1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    return (rank >= k) | (mass_before >= top_p.unsqueeze(1))


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf.

    `logits` is [B, V]; `top_k` [B] (0 = no limit) and `top_p` [B] per row. The
    best token always survives.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop_sorted = _mask_sorted(sorted_logits, top_k, top_p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _candidates(rows: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of each row's allowed tokens, best first.

    A full sort of the vocabulary costs ~2 ms a row; when every row has a top-k,
    only the best max(k) candidates are sorted, which gives the same result.
    """
    vocab = rows.shape[-1]
    if bool((top_k > 0).all()):
        values, ids = torch.topk(rows, min(int(top_k.max()), vocab), dim=-1)
    else:
        values, ids = torch.sort(rows, dim=-1, descending=True)
    values = values.masked_fill(_mask_sorted(values, top_k, top_p), float("-inf"))
    return values.softmax(-1), ids


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    seen_ids: Sequence[Optional[torch.Tensor]] = (),
    output_counts: Sequence[Optional[torch.Tensor]] = (),
) -> list[int]:
    """Next token for every row of `logits` [B, V]."""
    logits = logits.float()
    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0 and seen_ids and seen_ids[i] is not None:
            logits[i] = apply_repetition_penalty(logits[i], seen_ids[i], p.repetition_penalty)
        if p.counts_output and output_counts and output_counts[i] is not None:
            logits[i] = apply_presence_frequency_penalty(logits[i], output_counts[i], p.presence_penalty, p.frequency_penalty)
    tokens: list[int] = [0] * len(params)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist()):
            tokens[i] = t
    # rows with a top-k share one cheap top-k; a top-p without top-k needs the full sort;
    # rows with neither sample from the whole softmax
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    free = [i for i in sampled if params[i].top_k <= 0 and params[i].top_p >= 1.0]
    if free:
        temps = torch.tensor([params[i].temperature for i in free], device=logits.device).unsqueeze(1)
        probs = (logits[free] / temps).softmax(-1)
        for row, i in enumerate(free):
            tokens[i] = int(torch.multinomial(probs[row], 1, generator=generators[i]))
    limited = [i for i in sampled if params[i].top_k > 0]
    nucleus = [i for i in sampled if params[i].top_k <= 0 and params[i].top_p < 1.0]
    for group in (limited, nucleus):
        if not group:
            continue
        temps = torch.tensor([params[i].temperature for i in group], device=logits.device).unsqueeze(1)
        top_k = torch.tensor([params[i].top_k for i in group], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in group], device=logits.device)
        probs, ids = _candidates(logits[group] / temps, top_k, top_p)
        for row, i in enumerate(group):
            # each request draws from its own generator, so a seed reproduces its text in any batch
            tokens[i] = int(ids[row, torch.multinomial(probs[row], 1, generator=generators[i])])
    return tokens
