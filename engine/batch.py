"""The running batch: one left-padded KV cache shared by every active sequence.

Sequences join after a (batched) prefill and leave when they finish; each
decode step is one forward pass over all of them. Left padding keeps every
row's newest token in the last column, so one [B, 1] input advances them all;
the attention mask hides the padding and position ids count only real tokens.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_of(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    from engine.kv_cache import GrowingCache

    return GrowingCache(kv)


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Zero-pad `n` positions in front along `dim` (the sequence axis)."""
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [n, 0]
    return F.pad(t, pad)


class RunningBatch:
    """Rows (sequences), their shared KV cache, and the attention mask [B, L]."""

    def __init__(self) -> None:
        self.rows: list[Any] = []
        self.cache = None
        self.mask: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, rows: Sequence[Any], cache, mask: torch.Tensor) -> None:
        """Merge freshly prefilled rows (their own left-padded cache and mask) into the batch."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        from engine.kv_cache import GrowingCache, stacked

        width = max(self.width, mask.shape[1])
        # one copy of every row into a buffer with room to grow (a merge is on the path of every stream's next token)
        self.cache = GrowingCache.of_layers([stacked([mine, theirs], width) for mine, theirs in zip(self.cache.layers, cache.layers)])
        self.mask = torch.cat([_pad_left(self.mask, width - self.width, 1), _pad_left(mask, width - mask.shape[1], 1)])
        self.rows.extend(rows)

    def keep(self, keep_rows: Sequence[int]) -> None:
        """Keep only these row indices; drop columns that are padding in every remaining row."""
        if len(keep_rows) == len(self.rows):
            return
        if not keep_rows:
            self.rows, self.cache, self.mask = [], None, None
            return
        from engine.kv_cache import GrowingCache

        index = torch.tensor(keep_rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        # leading columns no remaining row uses
        used = mask.sum(0) > 0
        start = int(torch.nonzero(used)[0]) if bool(used.any()) else 0
        if start * 4 < self.width:
            # a few padding columns cost less to attend over than a second copy of every row costs to drop
            self.cache = GrowingCache.of_layers([layer.select_rows(index) for layer in self.cache.layers])
            self.mask = mask
        else:
            self.cache = cache_of([(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                                   for k, v in _kv(self.cache)])
            self.mask = mask[:, start:].contiguous()
        self.rows = [self.rows[i] for i in keep_rows]

    def step_inputs(self, tokens: Sequence[int]) -> dict:
        """Inputs for one decode step: each row's last token, extended mask, per-row positions."""
        device = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)], dim=1)
        positions = self.mask.sum(1, keepdim=True) - 1
        return {
            "input_ids": torch.tensor([[t] for t in tokens], device=device),
            "attention_mask": self.mask,
            "position_ids": positions,
            "past_key_values": self.cache,
            "use_cache": True,
        }


def prefill_inputs(prompts: Sequence[Sequence[int]], pad_id: int, device, prefixes: Sequence[Any] = ()) -> dict:
    """Left-padded inputs for prefilling several prompts in one forward pass.

    `prefixes` (PrefixMatch per prompt, optional) give the KV of each prompt's
    first tokens: only the rest is fed to the model. The cached KV goes in
    front, left-padded to the longest prefix, and the remaining tokens follow,
    left-padded too, so a row may hold padding between its two parts; the
    attention mask hides it and the position ids count only real tokens.
    """
    reused = [m.tokens for m in prefixes] if prefixes else [0] * len(prompts)
    rests = [p[n:] for p, n in zip(prompts, reused)]
    past, width = max(reused), max(len(r) for r in rests)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), past + width), dtype=torch.long)
    positions = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (rest, n) in enumerate(zip(rests, reused)):
        ids[i, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
        mask[i, past - n:past] = 1
        mask[i, past + width - len(rest):] = 1
        positions[i, width - len(rest):] = torch.arange(n, n + len(rest))
    inputs = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
        "use_cache": True,
    }
    if past:
        inputs["past_key_values"] = cache_of(_stack_prefixes(prefixes, past))
    return inputs


def _stack_prefixes(prefixes: Sequence[Any], past: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One [B, heads, past, dim] key and value tensor per layer; rows without a prefix are zeros."""
    template = next(m.kv for m in prefixes if m.kv is not None)
    layers = []
    for layer, (k0, v0) in enumerate(template):
        ks, vs = [], []
        for m in prefixes:
            if m.kv is None:
                ks.append(k0.new_zeros((1, k0.shape[1], past, k0.shape[3])))
                vs.append(v0.new_zeros((1, v0.shape[1], past, v0.shape[3])))
            else:
                k, v = m.kv[layer]
                ks.append(_pad_left(k, past - k.shape[-2], -2))
                vs.append(_pad_left(v, past - v.shape[-2], -2))
        layers.append((torch.cat(ks), torch.cat(vs)))
    return layers


def row_kv(cache, mask: torch.Tensor, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of one row's keys and values without padding ([1, heads, tokens, dim] per layer)."""
    index = torch.nonzero(mask[row]).flatten()
    return [(k[row:row + 1].index_select(2, index), v[row:row + 1].index_select(2, index)) for k, v in _kv(cache)]
