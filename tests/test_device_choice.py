"""Weights' dtype per device and format (measured on an H200: bench/README.md, "GPU")."""

import torch

from engine.loader import pick_dtype
from engine.sampling import make_generator


def test_auto_precision():
    assert pick_dtype("auto", "cpu") is torch.float32
    # GGUF weights stay packed and compute in fp32: bf16 only added casts (4x slower, 6/16 greedy agreement)
    assert pick_dtype("auto", "cuda", gguf=True) is torch.float32
    assert pick_dtype("bf16", "cuda", gguf=True) is torch.bfloat16  # an explicit choice is honoured


def test_generators_live_on_the_logits_device():
    assert make_generator(1).device.type == "cpu"
    assert make_generator(1, torch.device("cpu")).device == torch.device("cpu")
