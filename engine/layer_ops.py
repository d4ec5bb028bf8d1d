"""A decoder layer's operations, looked up once for the one-pass step: its products, norms and sizes.

A one-pass step runs about 40 operations in each of the model's 30 layers.
Called through the modules (nn.Module's call machinery, attribute chains,
PackedLinear's shape and grad checks, the Llama RMSNorm's six operations
from Python), much of that is Python time in which the second core waits.
Here each layer's products become plain functions of a [tokens, features]
matrix and its RMSNorms one `F.rms_norm` call, with the same arithmetic.
Together with the four-operation rotation and in-place residual adds
(engine/fused_forward.py) the step's logits are bit-identical and the step
on two AVX2 cores went from 108.7 to 101.8 ms at 32 rows, 56.8 to 49.9 at 8
and 40.7 to 35.0 at 1 (medians of three alternations, bench/README.md, "Round 9").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from engine.joined_projections import WeightView
from engine.packed_linear import PackedLinear

Op = Callable[[torch.Tensor], torch.Tensor]

#: activation modules whose forward is `F.silu` (torch's, and transformers' ACT2FN["silu"])
SILUS = {"SiLU", "SiLUActivation"}

#: norms computing weight * (x * rsqrt(mean(x²) + eps)) in float32, which `F.rms_norm` does identically
RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}


@dataclass(frozen=True)
class LayerOps:
    """One decoder layer for the one-pass step. `qkv`/`gate_up` are the joined products where
    engine/joined_projections.py made them, else None and `q`, `k`, `v`/`mlp` are used."""

    norm_in: Op
    norm_post: Op
    qkv: Optional[Op]
    q: Op
    k: Op
    v: Op
    q_heads: int
    kv_heads: int
    o: Op
    gate_up: Optional[Op]
    mlp: Op
    down: Op
    act: Op
    head_dim: int
    scaling: float


def product(module: torch.nn.Module) -> Op:
    """The module's product of a [rows, in] matrix, without the module call (inference only)."""
    if isinstance(module, PackedLinear):
        return module.product_2d
    if type(module) in (torch.nn.Linear, WeightView):
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module


def norm(module: torch.nn.Module) -> Op:
    """`F.rms_norm` where it was checked to give the module's numbers bit for bit: fp32 on a CPU
    (tests/test_layer_ops.py); elsewhere (a GPU's fused kernel) the module itself."""
    weight = getattr(module, "weight", None)
    if type(module).__name__ in RMS_NORMS and isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 and \
            weight.device.type == "cpu" and isinstance(getattr(module, "variance_epsilon", None), float):
        weight, eps, shape = module.weight, module.variance_epsilon, (module.weight.shape[0],)
        return lambda x: F.rms_norm(x, shape, weight, eps)
    return module


def layer_ops(layer) -> LayerOps:
    attn, mlp = layer.self_attn, layer.mlp
    joined_qkv = getattr(attn, "qkv_proj", None)
    joined_mlp = getattr(mlp, "gate_up_proj", None)
    act = mlp.act_fn if hasattr(mlp, "act_fn") else None
    return LayerOps(
        norm_in=norm(layer.input_layernorm), norm_post=norm(layer.post_attention_layernorm),
        qkv=product(joined_qkv) if joined_qkv is not None else None,
        q=product(attn.q_proj), k=product(attn.k_proj), v=product(attn.v_proj),
        q_heads=attn.q_proj.out_features // attn.head_dim, kv_heads=attn.k_proj.out_features // attn.head_dim,
        o=product(attn.o_proj),
        gate_up=product(joined_mlp) if joined_mlp is not None else None, mlp=mlp,
        down=product(mlp.down_proj) if hasattr(mlp, "down_proj") else mlp,
        act=F.silu if type(act).__name__ in SILUS else act,
        head_dim=attn.head_dim, scaling=attn.scaling)
