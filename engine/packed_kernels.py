"""The two libraries in torch's CPU build that multiply against a weight packed once: MKL and oneDNN.

Which is faster depends on the CPU, by a lot. On the AVX-512 machine of round
5, MKL's packed product took the 8-row output layer from 13.9 to 6.6 ms. On an
AVX2 AMD EPYC it barely helps: 15.4 -> 14.2 ms, while oneDNN's takes 5.5 ms.
So engine/packed_linear.py measures both on each weight shape at load and
keeps the faster one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

#: the row count each library is told when it packs; the buffer serves any count (checked at load)
PACK_ROWS = 32


@dataclass(frozen=True)
class Kernel:
    """`pack(weight)` makes the opaque buffer; `product()` returns a function that multiplies [rows, in] by it."""

    name: str
    pack: Callable[[torch.Tensor], torch.Tensor]
    product: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], Callable[[torch.Tensor, int], torch.Tensor]]


def _mkl_product(packed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    # the overload resolved once: a decode step calls it ~200 times
    op = torch.ops.mkl._mkl_linear.default
    return lambda x, rows: op(x, packed, weight, bias, rows)


def _onednn_product(packed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    op = torch.ops.mkldnn._linear_pointwise.default
    return lambda x, rows: op(x, packed, bias, "none", [], "")


MKL = Kernel("mkl", lambda weight: torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS), _mkl_product)
ONEDNN = Kernel("onednn", lambda weight: torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS), _onednn_product)


def available_kernels() -> dict[str, Kernel]:
    """The packed products this torch build has, by name."""
    found = {}
    mkl = getattr(torch.backends, "mkl", None)
    if mkl is not None and mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear") and \
            hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        found[MKL.name] = MKL
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") and \
            hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        found[ONEDNN.name] = ONEDNN
    return found


def seconds_per_call(call: Callable[[], object], budget_s: float = 0.012, least: int = 3) -> float:
    """Median seconds of `call()` after one warm-up, over at least `least` calls or `budget_s` of calls."""
    call()
    times: list[float] = []
    spent = 0.0
    while len(times) < least or spent < budget_s:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
        spent += times[-1]
    times.sort()
    return times[len(times) // 2]
