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

    def spare(self) -> int:
        """Columns the buffer can still take before it must grow (a copy of every row)."""
        return 0 if not self.is_initialized or self._keys is None else self._keys.shape[-2] - self._filled

    def put_rows(self, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write these rows' keys and values, right-aligned, into rows `index` (free slots); zeros in front.

        The zeros matter: a free slot's old columns may hold anything, and attention
        gives masked columns weight 0, but 0 x NaN is NaN.
        """
        filled, width = self._filled, keys.shape[-2]
        for buffer, source in ((self._keys, keys), (self._values, values)):
            buffer[index, :, :filled - width] = 0
            buffer[index, :, filled - width:filled] = source

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


def stacked(pieces: Sequence[tuple[torch.Tensor, torch.Tensor]], width: int) -> GrowingLayer:
    """The pieces' rows (keys, values [rows, heads, cols, dim], views) in one layer `width` columns wide, each
    right-aligned (left padding), copied once into a buffer with room to grow.

    The padding is zeros, not whatever the memory held: attention gives it weight 0, and 0 x NaN is NaN.
    """
    first_keys, first_values = pieces[0]
    rows = sum(k.shape[0] for k, _ in pieces)
    keys = first_keys.new_empty((rows, first_keys.shape[1], with_spare_room(width), first_keys.shape[-1]))
    values = first_values.new_empty((rows, first_values.shape[1], with_spare_room(width), first_values.shape[-1]))
    row = 0
    for piece in pieces:
        n, filled = piece[0].shape[0], piece[0].shape[-2]
        for buffer, source in zip((keys, values), piece):
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
