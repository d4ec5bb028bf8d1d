"""Each layer's q, k and v projections as one product, and the MLP's gate and up as another, for the one-pass step.

All three (or two) read the same input, so one product over the stacked
weights does the same arithmetic with one call and one pass over the input
instead of three: on the AVX2 machine of round 7, q+k+v at 8 rows 0.146 ->
0.099 ms, gate+up 0.257 -> 0.230 ms, per layer (bench/README.md).

The stacked weight is the only copy the model keeps: the separate layers
keep working (the model's own forward, which the runner falls back to) over
views of it, and the loaded originals are released. Those views are
`WeightView` layers, which engine/packed_linear.py leaves as they are, so
only the joined product gets a packed copy. Where the weights were loaded
from a memory-mapped file (safetensors on a CPU), the released originals'
clean file pages stay counted in RSS until the kernel needs the memory: the
embedded model's RSS after a forward pass is ~200 MB higher joined (1,863
against 1,664 MB, bench/README.md "Round 7").
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class WeightView(torch.nn.Linear):
    """An `nn.Linear` whose weight (and bias) are views into a joined layer's; not packed on its own."""


def _join(parent: torch.nn.Module, names: Sequence[str]) -> Optional[torch.nn.Linear]:
    parts = [getattr(parent, n, None) for n in names]
    if any(type(p) is not torch.nn.Linear for p in parts):
        return None
    first = parts[0]
    if len({(p.in_features, p.weight.dtype, p.weight.device, p.bias is None) for p in parts}) != 1:
        return None
    with torch.no_grad():
        joined = torch.nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                                 device="meta")
        joined.weight = torch.nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
        if first.bias is not None:
            joined.bias = torch.nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        start = 0
        for name, part in zip(names, parts):
            view = WeightView(part.in_features, part.out_features, bias=part.bias is not None, device="meta")
            view.weight = torch.nn.Parameter(joined.weight[start:start + part.out_features], requires_grad=False)
            if part.bias is not None:
                view.bias = torch.nn.Parameter(joined.bias[start:start + part.out_features], requires_grad=False)
            setattr(parent, name, view)
            start += part.out_features
    return joined


def join_projections(model) -> int:
    """Give each Llama-layout layer `self_attn.qkv_proj` and `mlp.gate_up_proj` where its layers allow
    (plain Linear layers alike in input, dtype, device and bias); returns how many were joined."""
    joined = 0
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _join(attn, ("q_proj", "k_proj", "v_proj"))
        if qkv is not None:
            attn.qkv_proj = qkv
            joined += 1
        gate_up = _join(mlp, ("gate_proj", "up_proj")) if hasattr(mlp, "act_fn") and hasattr(mlp, "down_proj") else None
        if gate_up is not None:
            mlp.gate_up_proj = gate_up
            joined += 1
    return joined
