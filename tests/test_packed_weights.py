"""fp32 Linear layers on CPU run against weights packed once for MKL: same answers, checked at load."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
import torch.nn.functional as F

from engine import packed_linear
from engine.packed_linear import LAYER_ROWS, WIDE_ROWS, PackedLinear, RowRange
from engine.passing_thread import run_in_passing_thread

pytestmark = [pytest.mark.skipif(not packed_linear.available(), reason="this torch build has no MKL packed products"),
              pytest.mark.torch_side_thread]


def _linear(out_features: int, in_features: int, bias: bool = False, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    return layer.requires_grad_(False)


@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (192, 576), (9000, 64)])
@torch.inference_mode()
def test_a_packed_product_matches_the_stock_one_at_every_row_count(shape):
    stock = _linear(*shape, bias=shape[0] == 192)
    packed = PackedLinear(stock, LAYER_ROWS)
    for rows in (1, 2, 5, 8, 13, 31, 32, 33, 70, 160):
        x = torch.randn(rows, shape[1])
        want, got = F.linear(x, stock.weight, stock.bias), packed(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the shapes a model passes: [batch, length, features]
    x = torch.randn(3, 7, shape[1])
    torch.testing.assert_close(packed(x), F.linear(x, stock.weight, stock.bias), rtol=1e-5, atol=1e-4)


@torch.inference_mode()
def test_the_packed_path_is_taken_only_inside_its_row_range():
    stock = _linear(600, 64)
    packed = PackedLinear(stock, RowRange(2, 8))
    # packed with the real weight, then the weight zeroed: only the packed path still sees the old values
    with torch.no_grad():
        keep = stock.weight.clone()
        stock.weight.zero_()
    x = torch.randn(8, 64)
    torch.testing.assert_close(packed(x), F.linear(x, keep), rtol=1e-5, atol=1e-4)
    assert bool((packed(x[:1]) == 0).all()), "one row must go to F.linear"
    assert bool((packed(torch.randn(9, 64)) == 0).all()), "rows past the range must go to F.linear"


def test_training_mode_falls_back_to_the_stock_product():
    layer = torch.nn.Linear(64, 32)
    packed = PackedLinear(layer, LAYER_ROWS)
    x = torch.randn(4, 64, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_a_packed_buffer_that_disagrees_is_refused_and_the_layer_stays_stock(caplog, monkeypatch):
    model = torch.nn.Sequential(_linear(256, 64), _linear(64, 256))
    good = PackedLinear(model[0], LAYER_ROWS)
    assert packed_linear.verify(good)
    # a buffer packed from other weights stands in for an MKL whose layout is not what we assume
    wrong = PackedLinear(model[0], LAYER_ROWS)
    wrong.packed = torch.ops.mkl._mkl_reorder_linear_weight(_linear(256, 64, seed=1).weight, packed_linear.PACK_ROWS)
    assert not packed_linear.verify(wrong)

    original = packed_linear.PackedLinear

    class Disagreeing(original):
        def __init__(self, linear, rows):
            super().__init__(linear, rows)
            if linear.out_features == 256:
                self.packed = wrong.packed

    monkeypatch.setattr(packed_linear, "PackedLinear", Disagreeing)
    with caplog.at_level(logging.WARNING, logger="engine.packed_linear"):
        count = packed_linear.pack_linears(model)
    assert count == 1
    assert type(model[0]) is torch.nn.Linear and isinstance(model[1], PackedLinear)
    assert "disagrees with F.linear for 256 x 64" in caplog.text


def test_the_served_model_runs_packed_and_keeps_its_weights_and_ties(engine):
    model = engine._model
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    assert linears and all(isinstance(m, PackedLinear) for m in linears)
    assert model.lm_head.rows == WIDE_ROWS and model.model.layers[0].mlp.down_proj.rows == LAYER_ROWS
    # the output layer still shares the embedding's weight, and the names a checkpoint uses are unchanged
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = set(model.state_dict())
    assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"} <= names
    assert not any("packed" in n for n in names)


def test_side_work_runs_in_a_thread_that_ends_and_hands_back_its_result_or_error():
    # this very test is marked torch_side_thread: its body already runs off the main thread
    assert threading.current_thread() is not threading.main_thread()
    seen = {}

    def work() -> int:
        seen["thread"] = threading.current_thread()
        return 42

    assert run_in_passing_thread(work) == 42
    assert not seen["thread"].is_alive() and seen["thread"] is not threading.current_thread()

    def broken() -> None:
        raise ValueError("no such weights")

    with pytest.raises(ValueError, match="no such weights"):
        run_in_passing_thread(broken)
