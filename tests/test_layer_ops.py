"""The one-pass step's layer operations (engine/layer_ops.py, `_rotated`) give the modules' numbers bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine.batch import prefill_inputs
from engine.fused_forward import FusedForward, Group, _rotated
from engine.joined_projections import join_projections
from engine.kv_cache import GrowingCache
from engine.layer_ops import layer_ops
from engine.packed_linear import PackedLinear, pack_linears
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("packed", [False, True])
def test_each_operation_equals_its_module_exactly(kind, packed):
    model = tiny_model(kind)
    join_projections(model)
    if packed:
        assert pack_linears(model) > 0
    layer = model.model.layers[1]
    ops = layer_ops(layer)
    assert ops.norm_in is not layer.input_layernorm  # replaced by F.rms_norm, not the module itself
    with torch.inference_mode():
        for rows in (1, 7, 33):
            x = torch.randn(rows, 64) * 3
            assert torch.equal(ops.norm_in(x), layer.input_layernorm(x))
            assert torch.equal(ops.norm_post(x), layer.post_attention_layernorm(x))
            assert torch.equal(ops.qkv(x), layer.self_attn.qkv_proj(x))
            assert torch.equal(ops.gate_up(x), layer.mlp.gate_up_proj(x))
            assert torch.equal(ops.o(x), layer.self_attn.o_proj(x))
            h = torch.randn(rows, 96)
            assert torch.equal(ops.down(h), layer.mlp.down_proj(h))
            assert torch.equal(ops.act(h), layer.mlp.act_fn(h))
    assert (ops.q_heads, ops.kv_heads, ops.head_dim) == (4, 2, 16)
    if packed:
        assert isinstance(layer.mlp.down_proj, PackedLinear)


def test_rotation_equals_transformers_rotary_embedding_exactly():
    model = tiny_model("llama")
    tokens, heads, dim = 11, 6, 16
    x = torch.randn(tokens, heads, dim) * 4
    positions = torch.arange(tokens).unsqueeze(0) * 7
    cos, sin = model.model.rotary_emb(x, positions)  # [1, tokens, dim]
    want, _ = apply_rotary_pos_emb(x.transpose(0, 1).unsqueeze(0), x.transpose(0, 1).unsqueeze(0), cos, sin)
    cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
    half = dim // 2
    got = _rotated(x, cos, torch.cat((-sin[..., :half], sin[..., half:]), -1))
    assert torch.equal(got, want[0].transpose(0, 1))


def test_a_module_the_step_does_not_know_is_called_as_it_is():
    model = tiny_model("llama")
    join_projections(model)
    layer = model.model.layers[0]

    class Halved(torch.nn.Module):  # not a norm layer_ops recognises
        def forward(self, x):
            return x / 2

    layer.input_layernorm = Halved()
    ops = layer_ops(layer)
    assert ops.norm_in is layer.input_layernorm
    # the whole step still equals the model's own forward with the unknown module in place
    prompts = [[5, 9, 13, 2, 7], [3, 4]]
    inputs = prefill_inputs(prompts, 0, "cpu")
    with torch.inference_mode():
        want = model(**inputs).logits[:, -1]
        got = FusedForward(model)([Group(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                                         GrowingCache())])[0]
    assert torch.allclose(got, want, atol=1e-5)
