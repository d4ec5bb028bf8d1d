"""fp32 Linear layers on CPU with their weights packed once for MKL, instead of on every call.

For every product of a few rows, MKL's sgemm first repacks the whole weight
matrix into its own blocked layout; at 8 rows the embedded model's output
layer spent 11 of its 14 ms doing that. `torch.ops.mkl._mkl_linear` runs the
product against a weight packed once at load: 576 x 1536 at 8 rows 0.081 ->
0.055 ms, the 49k-word output layer 13.9 -> 6.6 ms (bench/README.md,
"Round 5"). From about 20 rows on the results are bit-identical to
`F.linear`; below, the last bits move (~1e-6), as they already do between
batch sizes.

The packed layout is MKL's, not torch's, and the same packed buffer is used
for any number of rows; `verify` checks that against `F.linear` for every
weight shape at load, and packing is switched off (with a log line) wherever
it disagrees, so a different MKL or CPU never gives wrong answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACK_ROWS = 32  # the row count MKL is told at packing; the buffer serves any count (verified at load)
CHECK_ROWS = (2, 3, 8, 17, 32, 33, 100)


@dataclass(frozen=True)
class RowRange:
    """Row counts for which the packed product is used; outside it, `F.linear`."""

    lowest: int
    highest: int


# measured on the 2-core development machine (bench/README.md, "Round 5"): one row is a
# matrix-vector product MKL does not repack; the wide output layer gains up to 32 rows
# (12.4 -> 10.2 ms) and loses from 36 on, where sgemm's own packing is paid back
LAYER_ROWS = RowRange(2, 4096)
WIDE_ROWS = RowRange(2, 32)
WIDE_OUTPUTS = 8192


def available() -> bool:
    return bool(getattr(torch.backends, "mkl", None) and torch.backends.mkl.is_available()) and \
        hasattr(torch.ops.mkl, "_mkl_linear") and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


class PackedLinear(torch.nn.Module):
    """A drop-in for an fp32 `nn.Linear` on CPU: same weight and bias (shared, so ties stay tied), plus MKL's
    packed copy of the weight for products of `rows.lowest`..`rows.highest` rows."""

    def __init__(self, linear: torch.nn.Linear, rows: RowRange) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.rows = rows
        with torch.no_grad():
            # an opaque MKL buffer: kept as a plain attribute, not a parameter or buffer, so
            # state_dict, .to() and parameter counts see only the real weight
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), PACK_ROWS)
        # the overload resolved once: forward runs ~200 times a decode step
        self._product = torch.ops.mkl._mkl_linear.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if not (self.rows.lowest <= rows <= self.rows.highest) or x.dtype != torch.float32 or \
                (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        out = self._product(flat, self.packed, self.weight, self.bias, rows)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed rows {self.rows.lowest}-{self.rows.highest}"


def verify(linear: PackedLinear, tolerance: float = 1e-4) -> bool:
    """The packed product agrees with `F.linear` at several row counts (relative to the output's scale)."""
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rows in CHECK_ROWS:
            if not (linear.rows.lowest <= rows <= linear.rows.highest):
                continue
            x = torch.randn(rows, linear.in_features, generator=generator)
            want = F.linear(x, linear.weight, linear.bias)
            got = linear(x)
            scale = float(want.abs().max()) or 1.0
            if got.shape != want.shape or not bool(torch.isfinite(got).all()) or \
                    float((got - want).abs().max()) > tolerance * scale:
                return False
    return True


def pack_linears(model: torch.nn.Module) -> int:
    """Replace the model's fp32 CPU Linear layers by PackedLinear, each shape verified once; returns how many."""
    if not available():
        log.info("MKL packed products are not available in this torch build; Linear layers run as loaded")
        return 0
    verified: dict[tuple[int, int, bool, RowRange], bool] = {}
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child.weight.dtype != torch.float32 or child.weight.device.type != "cpu":
                continue
            rows = WIDE_ROWS if child.out_features >= WIDE_OUTPUTS else LAYER_ROWS
            packed = PackedLinear(child, rows)
            key = (child.in_features, child.out_features, child.bias is not None, rows)
            if key not in verified:
                verified[key] = verify(packed)
                if not verified[key]:
                    log.warning("MKL's packed product disagrees with F.linear for %d x %d weights here; "
                                "those layers keep the stock product", child.out_features, child.in_features)
            if verified[key]:
                setattr(parent, name, packed)
                replaced += 1
    return replaced
