"""Turning a batch of logits rows into next tokens, each row with its own request's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from engine.types import SamplingParams


def make_generator(seed: Optional[int], device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A request's own random stream, on the device its logits live on (torch samples CUDA tensors only with
    a CUDA generator)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        # torch takes seeds in [0, 2**64); n choices add an offset to the request's seed
        generator.manual_seed(seed % 2**64)
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


# Candidates probed before a wider search, then a full sort: at the embedded model's
# temperature 0.2 the 64 best tokens hold the nucleus of nearly every row, and at
# temperature 1 the 1024 best hold a 0.95 nucleus for ~97% of rows.
PROBE_WIDTHS = (64, 1024)
NUCLEUS_PROBE = PROBE_WIDTHS[-1]


def _mask_sorted(sorted_probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """On rows of probabilities sorted best-first: True where a token falls outside top-k or the top-p nucleus.

    As in transformers' warpers, top-p is measured after top-k: over a row's own
    k best, renormalised, when it has a top-k, else over the whole vocabulary
    (the probabilities are already normalised over it, so a row holding only
    the best candidates needs nothing else).
    """
    width = sorted_probs.shape[-1]
    rank = torch.arange(width, device=sorted_probs.device).expand_as(sorted_probs)
    limited = top_k > 0
    outside_k = rank >= torch.where(limited, top_k, torch.full_like(top_k, width)).unsqueeze(1)
    kept = sorted_probs.masked_fill(outside_k, 0.0)
    norm = torch.where(limited, kept.sum(-1), torch.ones_like(top_p, dtype=kept.dtype))
    probs = kept / norm.unsqueeze(1)
    mass_before = probs.cumsum(-1) - probs
    drop = outside_k | (mass_before >= top_p.unsqueeze(1))
    # the best token always stays, even for a top_p too small for float32 (5e-324 rounds to 0)
    drop[:, 0] = False
    return drop


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf (the full-sort reference).

    `logits` is [B, V]; `top_k` [B] (0 = no limit) and `top_p` [B] per row. The
    best token always survives.
    """
    sorted_probs, order = torch.sort(logits.softmax(-1), dim=-1, descending=True)
    drop_sorted = _mask_sorted(sorted_probs, top_k, top_p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass
class Candidates:
    """Some rows' allowed tokens, best first: `probs` [n, W] (0 past a row's allowed prefix), `ids` [n, W]."""

    rows: list[int]
    probs: torch.Tensor
    ids: torch.Tensor


def candidates(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> list[Candidates]:
    """Each row's allowed tokens (top-k, then top-p), in as few blocks as the rows allow.

    A full sort of the vocabulary costs ~2 ms a row. Only the best candidates
    are sorted instead, which gives the same answer whenever they contain the
    whole allowed set: always for a top-k, and for a bare top-p when they hold
    top_p of the probability mass. Rows where they do not are searched again
    wider, then sorted in full.
    """
    vocab = scaled.shape[-1]
    probs = scaled.softmax(-1)
    limited = top_k > 0
    widest_k = int(top_k.max()) if bool(limited.any()) else 0
    pending = list(range(scaled.shape[0]))
    blocks: list[Candidates] = []
    for probe in (*PROBE_WIDTHS, vocab):
        index = torch.tensor(pending, device=scaled.device)
        whole = len(pending) == scaled.shape[0]
        rows = probs if whole else probs.index_select(0, index)
        k, p = (top_k, top_p) if whole else (top_k[index], top_p[index])
        width = min(vocab, max(widest_k, probe))
        values, ids = torch.topk(rows, width, dim=-1)
        covered = (k > 0) | (values.sum(-1) >= p) | (width == vocab)
        if bool(covered.all()):
            keep = slice(None)
            done = pending
        else:
            keep = torch.nonzero(covered).flatten()
            done = [pending[i] for i in keep.tolist()]
        if done:
            values, ids, k, p = values[keep], ids[keep], k[keep], p[keep]
            blocks.append(Candidates(done, values.masked_fill(_mask_sorted(values, k, p), 0.0), ids))
        pending = [i for i, c in zip(pending, covered.tolist()) if not c]
        if not pending:
            break
    return blocks


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose share of the row's (unnormalised) weights `uniforms` [n] falls into.

    Raises if a row has no positive finite weight, as torch.multinomial would.
    """
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1]
    if not bool((torch.isfinite(total) & (total > 0)).all()) or bool((probs < 0).any()):
        raise ValueError("a row's sampling probabilities are not finite and positive")
    target = (uniforms.double() * total).unsqueeze(1)
    # the first position whose cumulative weight passes the target: never a zero-weight one
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=probs.shape[-1] - 1)


def uniforms_for(rows: Sequence[int], generators: Sequence[torch.Generator], device) -> torch.Tensor:
    """One uniform draw per row, each from its request's own generator (so a seed's text does not depend on the batch)."""
    return torch.cat([torch.rand(1, generator=generators[i], device=generators[i].device) for i in rows]).to(device)


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    seen_ids: Sequence[Optional[torch.Tensor]] = (),
    output_counts: Sequence[Optional[torch.Tensor]] = (),
) -> list[Union[int, Exception]]:
    """Next token for every row of `logits` [B, V]; a row whose settings break sampling gets its exception.

    The rows are sampled together; if that fails (one request's numbers made a
    probability NaN, say), they are sampled again one by one, so only the rows
    that fail on their own get an exception and every other request goes on.
    """
    try:
        return list(_sample_rows(logits, params, generators, seen_ids, output_counts))
    except Exception:
        out: list[Union[int, Exception]] = []
        for i in range(len(params)):
            try:
                out += _sample_rows(logits[i:i + 1], params[i:i + 1], generators[i:i + 1],
                                    seen_ids[i:i + 1], output_counts[i:i + 1])
            except Exception as exc:
                out.append(exc)
        return out


def _sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    seen_ids: Sequence[Optional[torch.Tensor]],
    output_counts: Sequence[Optional[torch.Tensor]],
) -> list[int]:
    logits = logits.float()
    vocab = logits.shape[-1]
    if any(p.repetition_penalty != 1.0 or p.counts_output for p in params):
        logits = logits.clone()  # penalties write rows in place; the caller's logits stay as they were
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
    # a top-k at or past the vocabulary size keeps every token: the same as none
    top_ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    # rows with neither a top-k nor a top-p draw from the whole softmax
    free = [i for i in sampled if top_ks[i] == 0 and params[i].top_p >= 1.0]
    if free:
        probs = (_rows(logits, free) / _column([params[i].temperature for i in free], logits.device)).softmax(-1)
        for i, t in zip(free, draw(probs, uniforms_for(free, generators, logits.device)).tolist()):
            tokens[i] = t
    # rows with a top-k or a top-p share one candidate search, and one vectorised draw per block of it
    filtered = [i for i in sampled if i not in free]
    if filtered:
        device = logits.device
        scaled = _rows(logits, filtered) / _column([params[i].temperature for i in filtered], device)
        top_k = torch.tensor([top_ks[i] for i in filtered], device=device)
        top_p = torch.tensor([params[i].top_p for i in filtered], device=device)
        for block in candidates(scaled, top_k, top_p):
            rows = [filtered[j] for j in block.rows]
            picked = draw(block.probs, uniforms_for(rows, generators, device))
            for i, t in zip(rows, block.ids.gather(1, picked.unsqueeze(1)).flatten().tolist()):
                tokens[i] = t
    return tokens


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    # all rows is the usual case: no copy of a [B, V] tensor
    return logits if len(rows) == logits.shape[0] else logits[rows]


def _column(values: list[float], device) -> torch.Tensor:
    return torch.tensor(values, device=device).unsqueeze(1)
