"""q/k/v and gate/up joined into one product each: the same numbers, no extra memory, the model's own forward intact."""

from __future__ import annotations

import pytest
import torch

from engine.batch import prefill_inputs
from engine.fused_forward import FusedForward, Group
from engine.joined_projections import WeightView, join_projections
from engine.kv_cache import GrowingCache
from engine.packed_linear import PackedLinear, pack_linears
from tests.tiny_models import tiny_model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2's q/k/v have biases
def test_joined_products_give_the_separate_products_numbers(kind):
    model = tiny_model(kind)
    x = torch.randn(7, 64)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    with torch.inference_mode():
        want_qkv = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
        want_mlp = mlp(x)
        ids = torch.randint(0, 300, (2, 9))
        want_logits = model(input_ids=ids).logits
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert join_projections(model) == 4  # two layers, attention and MLP each
    with torch.inference_mode():
        got = attn.qkv_proj(x).split([want.shape[-1] for want in want_qkv], -1)
        for want, have in zip(want_qkv, got):
            assert torch.allclose(want, have, atol=1e-6)
        gate, up = mlp.gate_up_proj(x).chunk(2, -1)
        assert torch.allclose(mlp.down_proj(mlp.act_fn(gate) * up), want_mlp, atol=1e-6)
        # the model's own forward runs on the views: the same products on the same numbers, bit for bit
        assert torch.equal(model(input_ids=ids).logits, want_logits)
    after = model.state_dict()
    for name, value in before.items():  # every original name keeps its values
        assert torch.equal(after[name], value), name


def test_the_separate_layers_are_views_of_the_joined_weight_and_only_it_is_packed():
    model = tiny_model("llama")
    join_projections(model)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    joined = attn.qkv_proj.weight
    assert attn.q_proj.weight.data_ptr() == joined.data_ptr()
    assert attn.v_proj.weight.data_ptr() == joined.data_ptr() + (64 + 32) * 64 * joined.element_size()
    assert mlp.up_proj.weight.data_ptr() == mlp.gate_up_proj.weight.data_ptr() + 96 * 64 * joined.element_size()
    pack_linears(model)
    assert all(type(getattr(attn, n)) is WeightView for n in ("q_proj", "k_proj", "v_proj"))
    assert all(type(getattr(mlp, n)) is WeightView for n in ("gate_proj", "up_proj"))
    assert all(not isinstance(m, PackedLinear) for m in model.modules() if isinstance(m, WeightView))


def test_unlike_layers_are_not_joined():
    model = tiny_model("llama")
    attn = model.model.layers[0].self_attn
    attn.k_proj = torch.nn.Linear(64, 32, bias=True)  # q and v have none
    assert join_projections(model) == 3
    assert not hasattr(attn, "qkv_proj") and type(attn.q_proj) is torch.nn.Linear


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_one_pass_step_on_joined_projections_matches_it_on_separate_ones(kind):
    separate, joined = tiny_model(kind), tiny_model(kind)
    join_projections(joined)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    results = []
    for model in (separate, joined):
        inputs = prefill_inputs(prompts, 0, "cpu")
        with torch.inference_mode():
            results.append(FusedForward(model)([Group(inputs["input_ids"], inputs["attention_mask"],
                                                       inputs["position_ids"], GrowingCache())])[0])
    assert torch.allclose(results[0], results[1], atol=1e-5)
