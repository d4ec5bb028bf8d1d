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
    """Slots (rows of one shared KV cache and attention mask [S, L]) holding the running sequences.

    A slot whose sequence ended is free (None) until a newcomer that fits takes
    it: finishing and joining then write one row instead of copying every row's
    KV into a new buffer (14-18 ms at 8 rows on two cores, on the path of every
    stream's next token). The live rows are copied together only when that is
    cheaper than carrying the free slots (more free than live) or when the
    buffer must grow anyway, which also drops columns no live row uses.
    """

    def __init__(self) -> None:
        self.slots: list[Any] = []
        self.cache = None
        self.mask: Optional[torch.Tensor] = None

    @property
    def rows(self) -> list[Any]:
        """The live sequences, in slot order."""
        return [s for s in self.slots if s is not None]

    def live(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is not None]

    def __len__(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def can_fill(self, rows: int, width: int) -> bool:
        """Whether `rows` newcomers `width` columns wide fit into free slots without a copy."""
        return width <= self.width and len(self.slots) - len(self) >= rows

    def add(self, rows: Sequence[Any], cache, mask: torch.Tensor) -> None:
        """Merge freshly prefilled rows (their own left-padded cache and mask; None: a row that already ended)."""
        if not len(self):
            self.slots, self.cache, self.mask = list(rows), cache, mask
            return
        fresh = [j for j, r in enumerate(rows) if r is not None]
        if not fresh:
            return
        if self.can_fill(len(fresh), mask.shape[1]):
            self._fill([rows[j] for j in fresh], cache, mask, fresh)
        else:
            self._rebuild([(self.slots, self.cache, self.mask), (list(rows), cache, mask)])

    def release(self, slots: Sequence[int]) -> None:
        """These slots' sequences ended or left: the slots are free for newcomers."""
        for i in slots:
            self.slots[i] = None
        if slots and self.mask is not None:
            self.mask[list(slots)] = 0
        if not len(self):
            self.clear()

    def clear(self) -> None:
        self.slots, self.cache, self.mask = [], None, None

    def tidy(self) -> None:
        """Before a step: copy the live rows into a fresh buffer when carrying the rest costs more."""
        live = self.live()
        if not live:
            return
        free = len(self.slots) - len(live)
        about_to_grow = self.cache.layers[0].spare() < 1  # the step would copy every row anyway
        if free > len(live) or (about_to_grow and (free or _first_used_column(self.mask, live) * 4 >= self.width)):
            self._rebuild([(self.slots, self.cache, self.mask)])

    def _fill(self, rows: list[Any], cache, mask: torch.Tensor, fresh: list[int]) -> None:
        free = [i for i, s in enumerate(self.slots) if s is None][:len(rows)]
        index = torch.tensor(free, device=self.mask.device)
        chosen = torch.tensor(fresh, device=self.mask.device)
        whole = len(fresh) == mask.shape[0]
        for mine, theirs in zip(self.cache.layers, cache.layers):
            keys = theirs.keys if whole else theirs.keys.index_select(0, chosen)
            values = theirs.values if whole else theirs.values.index_select(0, chosen)
            mine.put_rows(index, keys, values)
        self.mask[index] = _pad_left(mask.index_select(0, chosen), self.width - mask.shape[1], 1)
        for slot, seq in zip(free, rows):
            self.slots[slot] = seq

    def _rebuild(self, sources: Sequence[tuple[list[Any], Any, torch.Tensor]]) -> None:
        """One copy of the sources' live rows into a new buffer, without the columns none of them uses."""
        from engine.kv_cache import GrowingCache, stacked

        pieces, masks, slots = [], [], []  # per source: runs of consecutive live slots, as views
        for rows, cache, mask in sources:
            live = [i for i, s in enumerate(rows) if s is not None]
            if not live:
                continue
            start = _first_used_column(mask, live)
            for a, b in _runs(live):
                pieces.append([(layer.keys[a:b, :, start:], layer.values[a:b, :, start:]) for layer in cache.layers])
                masks.append(mask[a:b, start:])
                slots.extend(rows[a:b])
        width = max(m.shape[1] for m in masks)
        self.cache = GrowingCache.of_layers([stacked([p[layer] for p in pieces], width) for layer in range(len(pieces[0]))])
        self.mask = torch.cat([_pad_left(m, width - m.shape[1], 1) for m in masks])
        self.slots = slots

    def step_inputs(self, tokens: Sequence[int]) -> dict:
        """Inputs for one decode step: each slot's last token (anything for a free slot), extended mask, positions.

        A free slot's new column is unmasked so that its row attends to itself: a row that sees
        nothing makes NaN, and a NaN written into the cache would poison the slot's next owner.
        """
        device = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones((len(self.slots), 1), dtype=self.mask.dtype, device=device)], dim=1)
        positions = self.mask.sum(1, keepdim=True) - 1
        return {
            "input_ids": torch.tensor([[t] for t in tokens], device=device),
            "attention_mask": self.mask,
            "position_ids": positions,
            "past_key_values": self.cache,
            "use_cache": True,
        }


def _first_used_column(mask: torch.Tensor, live: Sequence[int]) -> int:
    used = mask[live].sum(0) > 0
    return int(torch.nonzero(used)[0]) if bool(used.any()) else 0


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indices as [start, end) runs of consecutive values: one view, so one copy, per run."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


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
