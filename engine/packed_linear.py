"""fp32 Linear layers on CPU with their weights packed once, instead of on every call.

For every product of a few rows, the BLAS under `F.linear` first repacks the
whole weight matrix into its own blocked layout; at 8 rows the embedded
model's output layer spent 11 of its 14 ms doing that on the round-5
machine. MKL and oneDNN both multiply against a weight packed once at load
(engine/packed_kernels.py). Which of them is faster, and for which row
counts either beats the stock product at all, depends on the CPU: on an
AVX-512 Xeon MKL's won, on an AVX2 EPYC oneDNN's halves the output layer
and MKL's barely helps (bench/README.md, "Round 6"). So each weight shape is
measured at load: both packed products and the stock one, at one row count
from each bucket of row counts, and every bucket gets the fastest.

The packed layouts are the libraries' own, and one buffer is used for any
number of rows; `verify` checks that against `F.linear` for every weight
shape at load, and a product that disagrees is not used (with a log line),
so a different library or CPU never gives wrong answers. The last bits move
(~1e-6) as they already do between batch sizes.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from engine.packed_kernels import Kernel, available_kernels, seconds_per_call

log = logging.getLogger(__name__)

CHECK_ROWS = (1, 2, 3, 8, 17, 32, 33, 100)

#: row-count buckets, by their largest count, each measured at one count inside it; more than the
#: last (a long prompt's chunk) always runs stock, where both are bound by arithmetic anyway
BUCKET_TOPS = (1, 4, 12, 24, 48, 96, 4096)
BUCKET_PROBES = (1, 3, 8, 16, 32, 64, 160)


@dataclass(frozen=True)
class Plan:
    """For one weight shape: the packed kernel and, per bucket of BUCKET_TOPS, whether it runs packed."""

    kernel: Kernel
    packed: tuple[bool, ...]

    def describe(self) -> str:
        ranges, lowest = [], 1
        for use, top in zip(self.packed, BUCKET_TOPS):
            if use:
                if ranges and ranges[-1][1] == lowest - 1:
                    ranges[-1][1] = top
                else:
                    ranges.append([lowest, top])
            lowest = top + 1
        return f"{self.kernel.name} at " + ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges) + " rows"


class PackedLinear(torch.nn.Module):
    """A drop-in for an fp32 `nn.Linear` on CPU: same weight and bias (shared, so ties stay tied), plus a
    copy of the weight packed by `plan.kernel`, used for the row counts the plan marks."""

    def __init__(self, linear: torch.nn.Linear, plan: Plan) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.plan = plan
        with torch.no_grad():
            # an opaque library buffer: kept as a plain attribute, not a parameter or buffer, so
            # state_dict, .to() and parameter counts see only the real weight
            self.packed = plan.kernel.pack(self.weight.detach())
        self._product = plan.kernel.product(self.packed, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if not self._packed_at(rows) or x.dtype != torch.float32 or \
                (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        out = self._product(x.reshape(rows, self.in_features), rows)
        return out.view(*x.shape[:-1], self.out_features)

    def product_2d(self, x: torch.Tensor) -> torch.Tensor:
        """forward for an fp32 [rows, in] matrix under inference mode, without the checks (engine/layer_ops.py)."""
        rows = x.shape[0]
        return self._product(x, rows) if self._packed_at(rows) else F.linear(x, self.weight, self.bias)

    def _packed_at(self, rows: int) -> bool:
        """Whether the plan runs this many rows on the packed product (none past the last bucket)."""
        bucket = bisect_left(BUCKET_TOPS, rows)
        return rows >= 1 and bucket < len(BUCKET_TOPS) and self.plan.packed[bucket]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed {self.plan.describe()}"


def verify(linear: PackedLinear, tolerance: float = 1e-4) -> bool:
    """The packed product agrees with `F.linear` at several row counts (relative to the output's scale)."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in CHECK_ROWS:
            x = torch.randn(rows, linear.in_features, generator=generator)
            want = F.linear(x, linear.weight, linear.bias)
            got = linear(x)
            scale = float(want.abs().max()) or 1.0
            if got.shape != want.shape or not bool(torch.isfinite(got).all()) or \
                    float((got - want).abs().max()) > tolerance * scale:
                return False
    return True


def plan_for(linear: torch.nn.Linear, kernels: dict[str, Kernel]) -> Optional[Plan]:
    """The fastest product per row bucket for this weight shape, among the stock one and the kernels that
    agree with it; None when the stock product wins everywhere or no kernel agrees."""
    generator = torch.Generator().manual_seed(0)
    probes = [torch.randn(rows, linear.in_features, generator=generator) for rows in BUCKET_PROBES]
    with torch.inference_mode():
        stock = [seconds_per_call(lambda x=x: F.linear(x, linear.weight, linear.bias)) for x in probes]
        best: Optional[tuple[float, Plan]] = None
        for kernel in kernels.values():
            candidate = PackedLinear(linear, Plan(kernel, (True,) * len(BUCKET_TOPS)))
            if not verify(candidate):
                log.warning("%s's packed product disagrees with F.linear for %d x %d weights here; not used for them",
                            kernel.name, linear.out_features, linear.in_features)
                continue
            times = [seconds_per_call(lambda x=x, rows=rows: candidate._product(x, rows))
                     for x, rows in zip(probes, BUCKET_PROBES)]
            # relative to stock per bucket, so the wide buckets' milliseconds do not outvote the narrow ones
            score = sum(min(t, s) / s for t, s in zip(times, stock))
            if best is None or score < best[0]:
                best = (score, Plan(kernel, tuple(t < s for t, s in zip(times, stock))))
    if best is None or not any(best[1].packed):
        return None
    return best[1]


def pack_linears(model: torch.nn.Module, kernel: str = "auto", kernels: Optional[dict[str, Kernel]] = None) -> int:
    """Replace the model's fp32 CPU Linear layers by PackedLinear where a packed product is faster, one plan
    per weight shape (`kernel` names the library, or auto: the faster); returns how many were replaced."""
    kernels = available_kernels() if kernels is None else kernels
    if kernel != "auto":
        kernels = {name: k for name, k in kernels.items() if name == kernel}
    if not kernels:
        log.info("no packed product (%s) in this torch build; Linear layers run as loaded", kernel)
        return 0
    plans: dict[tuple[int, int, bool], Optional[Plan]] = {}
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child.weight.dtype != torch.float32 or child.weight.device.type != "cpu":
                continue
            key = (child.in_features, child.out_features, child.bias is not None)
            if key not in plans:
                plans[key] = plan_for(child, kernels)
                log.info("%d x %d weights: %s", child.out_features, child.in_features,
                         plans[key].describe() if plans[key] else "stock product (no packed one was faster)")
            if plans[key] is not None:
                setattr(parent, name, PackedLinear(child, plans[key]))
                replaced += 1
    return replaced
