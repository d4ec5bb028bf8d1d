"""Turning a batch of logits rows into next tokens, each row with its own request's settings."""

from __future__ import annotations

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


# Candidates probed before falling back to a full sort: at temperature 1 the 1024
# best tokens of this vocabulary hold a 0.95 nucleus for ~97% of rows.
NUCLEUS_PROBE = 1024


def _mask_sorted(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 log_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """On rows sorted best-first: True where a token falls outside top-k or the top-p nucleus.

    As in transformers' warpers, top-p is measured after top-k: over a row's own
    k best when it has a top-k, else over the whole vocabulary. `log_norm` [B]
    is that whole-vocabulary log-normaliser when `sorted_logits` holds only
    the best candidates; None means the rows are complete.
    """
    width = sorted_logits.shape[-1]
    rank = torch.arange(width, device=sorted_logits.device).expand_as(sorted_logits)
    limited = top_k > 0
    outside_k = rank >= torch.where(limited, top_k, torch.full_like(top_k, width)).unsqueeze(1)
    kept = sorted_logits.masked_fill(outside_k, float("-inf"))
    own_norm = kept.logsumexp(-1)
    norm = own_norm if log_norm is None else torch.where(limited, own_norm, log_norm)
    probs = (kept - norm.unsqueeze(1)).exp()
    mass_before = probs.cumsum(-1) - probs
    drop = outside_k | (mass_before >= top_p.unsqueeze(1))
    # the best token always stays, even for a top_p too small for float32 (5e-324 rounds to 0)
    drop[:, 0] = False
    return drop


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask everything outside each row's top-k and top-p nucleus with -inf.

    `logits` is [B, V]; `top_k` [B] (0 = no limit) and `top_p` [B] per row. The
    best token always survives.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop_sorted = _mask_sorted(sorted_logits, top_k, top_p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _candidates(rows: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (probabilities, token ids) of its allowed tokens, best first.

    A full sort of the vocabulary costs ~2 ms a row (over 100 ms a step at 32
    rows). Sorting only the best candidates gives the same answer whenever they
    contain the whole allowed set: always for a top-k, and for a bare top-p
    when the candidates already hold top_p of the probability mass. Rows
    where they do not are sorted in full.
    """
    vocab = rows.shape[-1]
    limited = top_k > 0
    width = min(vocab, max(int(top_k.max()), 0 if bool(limited.all()) else NUCLEUS_PROBE))
    values, ids = torch.topk(rows, width, dim=-1)
    log_norm = rows.logsumexp(-1)
    drop = _mask_sorted(values, top_k, top_p, log_norm)
    covered = limited | ((values - log_norm.unsqueeze(1)).exp().sum(-1) >= top_p) | (width == vocab)
    # kept tokens are a prefix of each sorted row; trimming to it makes a row's draw
    # independent of how wide the batch's candidate search was
    kept = (~drop).sum(-1).tolist()
    out = [(values[i, :n].softmax(-1), ids[i, :n]) for i, n in enumerate(kept)]
    for i in torch.nonzero(~covered).flatten().tolist():
        full_values, full_ids = torch.sort(rows[i:i + 1], dim=-1, descending=True)
        n = int((~_mask_sorted(full_values, top_k[i:i + 1], top_p[i:i + 1])).sum())
        out[i] = (full_values[0, :n].softmax(-1), full_ids[0, :n])
    return out


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
    # rows with neither a top-k nor a top-p sample from the whole softmax
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    free = [i for i in sampled if top_ks[i] == 0 and params[i].top_p >= 1.0]
    if free:
        temps = torch.tensor([params[i].temperature for i in free], device=logits.device).unsqueeze(1)
        probs = (logits[free] / temps).softmax(-1)
        for row, i in enumerate(free):
            tokens[i] = int(torch.multinomial(probs[row], 1, generator=generators[i]))
    # rows with a top-k or a top-p share one candidate search
    filtered = [i for i in sampled if i not in free]
    if filtered:
        temps = torch.tensor([params[i].temperature for i in filtered], device=logits.device).unsqueeze(1)
        top_k = torch.tensor([top_ks[i] for i in filtered], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in filtered], device=logits.device)
        for (probs, ids), i in zip(_candidates(logits[filtered] / temps, top_k, top_p), filtered):
            # each request draws from its own generator, so a seed reproduces its text in any batch
            tokens[i] = int(ids[torch.multinomial(probs, 1, generator=generators[i])])
    return tokens
