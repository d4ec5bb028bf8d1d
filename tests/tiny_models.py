"""Small random Llama-layout models for tests of the one-pass step's pieces (seconds to build, no download)."""

from __future__ import annotations

import torch


def tiny_model(kind: str):
    """Two layers, hidden 64, four query heads over two key heads, vocabulary 300; `kind` "llama" or "qwen2"
    (whose q/k/v have biases). The same weights on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=300, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape))
    return model.eval()
