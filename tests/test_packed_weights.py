"""fp32 Linear layers on CPU run against weights packed once (MKL's or oneDNN's layout): same answers, checked
and timed at load."""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left

import pytest
import torch
import torch.nn.functional as F

from engine import packed_linear
from engine.joined_projections import WeightView
from engine.packed_kernels import Kernel, available_kernels
from engine.packed_linear import BUCKET_TOPS, PackedLinear, Plan
from engine.passing_thread import run_in_passing_thread

KERNELS = available_kernels()
pytestmark = [pytest.mark.skipif(not KERNELS, reason="this torch build has no packed products"),
              pytest.mark.torch_side_thread]
EVERYWHERE = (True,) * len(BUCKET_TOPS)


def _linear(out_features: int, in_features: int, bias: bool = False, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    return layer.requires_grad_(False)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("shape", [(1536, 576), (576, 1536), (192, 576), (9000, 64)])
@torch.inference_mode()
def test_a_packed_product_matches_the_stock_one_at_every_row_count(shape, kernel):
    stock = _linear(*shape, bias=shape[0] == 192)
    packed = PackedLinear(stock, Plan(KERNELS[kernel], EVERYWHERE))
    for rows in (1, 2, 5, 8, 13, 31, 32, 33, 70, 160):
        x = torch.randn(rows, shape[1])
        want, got = F.linear(x, stock.weight, stock.bias), packed(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # the shapes a model passes: [batch, length, features]
    x = torch.randn(3, 7, shape[1])
    torch.testing.assert_close(packed(x), F.linear(x, stock.weight, stock.bias), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@torch.inference_mode()
def test_the_packed_path_is_taken_only_for_the_row_buckets_its_plan_marks(kernel):
    stock = _linear(600, 64)
    # packed for 2-4 and 13-24 rows only
    plan = Plan(KERNELS[kernel], tuple(top in (4, 24) for top in BUCKET_TOPS))
    assert plan.describe() == f"{kernel} at 2-4, 13-24 rows"
    packed = PackedLinear(stock, plan)
    # packed with the real weight, then the weight zeroed: only the packed path still sees the old values
    with torch.no_grad():
        keep = stock.weight.clone()
        stock.weight.zero_()
    for rows in (2, 4, 13, 24):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(packed(x), F.linear(x, keep), rtol=1e-5, atol=1e-4)
    for rows in (1, 5, 12, 25, 5000):
        assert bool((packed(torch.randn(rows, 64)) == 0).all()), f"{rows} rows must go to F.linear"


def test_training_mode_falls_back_to_the_stock_product():
    layer = torch.nn.Linear(64, 32)
    packed = PackedLinear(layer, Plan(next(iter(KERNELS.values())), EVERYWHERE))
    x = torch.randn(4, 64, requires_grad=True)
    packed(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_a_packed_product_that_disagrees_is_refused_and_the_layer_stays_stock(caplog):
    model = torch.nn.Sequential(_linear(256, 64), _linear(64, 256))
    real = next(iter(KERNELS.values()))
    assert packed_linear.verify(PackedLinear(model[0], Plan(real, EVERYWHERE)))
    # a library whose layout is not what we assume: for 256 x 64 it packs other weights
    other = _linear(256, 64, seed=1).weight

    def pack(weight: torch.Tensor) -> torch.Tensor:
        return real.pack(other if weight.shape == other.shape else weight)

    wrong = Kernel("wrong", pack, real.product)
    assert not packed_linear.verify(PackedLinear(model[0], Plan(wrong, EVERYWHERE)))
    with caplog.at_level(logging.WARNING, logger="engine.packed_linear"):
        count = packed_linear.pack_linears(model, kernels={"wrong": wrong})
    assert "wrong's packed product disagrees with F.linear for 256 x 64" in caplog.text
    assert type(model[0]) is torch.nn.Linear
    # the other shape is packed only where it measured faster than stock, which depends on the machine
    assert count == (isinstance(model[1], PackedLinear))
    if count:
        assert model[1].plan.kernel is wrong


@torch.inference_mode()
def test_a_plan_marks_the_buckets_where_the_packed_product_measured_faster():
    # a packed "library" that sleeps on wide products is slower there than any stock product
    real = next(iter(KERNELS.values()))

    def product(packed, weight, bias):
        run = real.product(packed, weight, bias)

        def slow_when_wide(x, rows):
            if rows > 12:
                time.sleep(0.02)
            return run(x, rows)
        return slow_when_wide

    plan = packed_linear.plan_for(_linear(512, 64), {"slow": Kernel("slow", real.pack, product)})
    assert plan is None or not any(plan.packed[bisect_left(BUCKET_TOPS, 13):]), plan.describe()


def test_an_unknown_packed_kernel_leaves_the_model_stock(caplog):
    model = torch.nn.Sequential(_linear(256, 64))
    with caplog.at_level(logging.INFO, logger="engine.packed_linear"):
        assert packed_linear.pack_linears(model, "nosuch") == 0
    assert type(model[0]) is torch.nn.Linear and "no packed product (nosuch)" in caplog.text


def test_the_served_model_runs_packed_and_keeps_its_weights_and_ties(engine):
    model = engine._model
    # views into joined q/k/v and gate/up weights (engine/joined_projections.py) are left to the joined products
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear)) and type(m) is not WeightView]
    assert linears and sum(isinstance(m, PackedLinear) for m in linears) >= len(linears) // 2
    # the output layer and the MLP's products measured at least 1.5x faster packed on every machine tried at 8 rows
    for layer in (model.lm_head, model.model.layers[0].mlp.gate_up_proj):
        assert isinstance(layer, PackedLinear) and layer.plan.packed[bisect_left(BUCKET_TOPS, 8)], layer
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
