"""A KV cache that appends into spare room instead of re-concatenating every step.

transformers' DynamicCache grows each layer with `torch.cat`, so every decode
step copies the whole batch's keys and values, per layer: at 32 rows of ~200
tokens that copy was 55% of a decode step on two CPU cores (torch profiler,
bench/README.md). Here each layer keeps a buffer with room to spare; a step
writes its one new column in place and the model reads a view of the filled
part. When the room runs out the buffer grows by a quarter, so the full copy
happens once every ~n/4 steps instead of every step.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

#: columns of spare room at least, on top of a quarter of the filled length
MIN_SPARE = 32


class GrowingLayer(DynamicLayer):
    """One layer's keys and values: `keys`/`values` are views of the filled part of a larger buffer."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._keys: Optional[torch.Tensor] = None
        self._values: Optional[torch.Tensor] = None
        self._filled = 0
        self.keys = self.values = None
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        filled, new = self._filled, key_states.shape[-2]
        if self._keys is None or filled + new > self._keys.shape[-2] or self._keys.shape[0] != key_states.shape[0]:
            self._grow(key_states, value_states, filled + new)
        self._keys[:, :, filled:filled + new] = key_states
        self._values[:, :, filled:filled + new] = value_states
        self._filled = filled + new
        self.keys = self._keys[:, :, :self._filled]
        self.values = self._values[:, :, :self._filled]
        return self.keys, self.values

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, filled: int) -> "GrowingLayer":
        """A layer over these buffers (not copied), of which the first `filled` columns are in use."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        layer._keys, layer._values, layer._filled = keys, values, filled
        layer.keys, layer.values = keys[:, :, :filled], values[:, :, :filled]
        return layer

    def select_rows(self, index: torch.Tensor) -> "GrowingLayer":
        """These rows only, spare room included: one copy, and the next step still appends in place."""
        return GrowingLayer.holding(self._keys.index_select(0, index), self._values.index_select(0, index), self._filled)

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        capacity = with_spare_room(needed)
        batch, heads, _, dim = key_states.shape
        keys = key_states.new_empty((batch, heads, capacity, dim))
        values = value_states.new_empty((batch, value_states.shape[1], capacity, value_states.shape[-1]))
        if self._filled:
            keys[:, :, :self._filled] = self._keys[:, :, :self._filled]
            values[:, :, :self._filled] = self._values[:, :, :self._filled]
        self._keys, self._values = keys, values

    def truncate(self, filled: int) -> None:
        """Forget the columns past `filled` (a pass that failed midway appended them to some layers only)."""
        if not self.is_initialized or self._keys is None:
            return
        self._filled = min(self._filled, filled)
        self.keys = self._keys[:, :, :self._filled]
        self.values = self._values[:, :, :self._filled]

    def get_seq_length(self) -> int:
        return self._filled if self.is_initialized else 0


def with_spare_room(needed: int) -> int:
    return needed + max(MIN_SPARE, needed // 4)


def stacked(parts: Sequence[GrowingLayer], width: int) -> GrowingLayer:
    """The parts' rows in one layer `width` columns wide, each right-aligned (left padding), copied once.

    The padding is zeros, not whatever the memory held: attention gives it weight 0, and 0 x NaN is NaN.
    """
    first = parts[0].keys
    rows = sum(p.keys.shape[0] for p in parts)
    values_dim = parts[0].values.shape[-1]
    keys = first.new_empty((rows, first.shape[1], with_spare_room(width), first.shape[-1]))
    values = first.new_empty((rows, first.shape[1], with_spare_room(width), values_dim))
    row = 0
    for part in parts:
        n, filled = part.keys.shape[0], part.keys.shape[-2]
        for buffer, source in ((keys, part.keys), (values, part.values)):
            buffer[row:row + n, :, :width - filled].zero_()
            buffer[row:row + n, :, width - filled:width] = source
        row += n
    return GrowingLayer.holding(keys, values, width)


class GrowingCache(DynamicCache):
    """A DynamicCache made of GrowingLayers, optionally starting from per-layer (keys, values)."""

    def __init__(self, kv: Optional[Iterable[tuple[torch.Tensor, torch.Tensor]]] = None) -> None:
        layers = []
        for keys, values in kv or ():
            layer = GrowingLayer()
            layer.update(keys, values)
            layers.append(layer)
        if layers:
            Cache.__init__(self, layers=layers)
        else:
            Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    @classmethod
    def of_layers(cls, layers: Sequence[GrowingLayer]) -> "GrowingCache":
        cache = cls.__new__(cls)
        Cache.__init__(cache, layers=list(layers))
        return cache
