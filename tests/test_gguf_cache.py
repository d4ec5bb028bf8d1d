"""A GGUF model is read once: later starts load its converted copy, which holds the same weights and tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from engine import gguf_cache
from engine.config import EngineConfig
from engine.loader import embedded_model_source, load_model

# runs the model in the test itself: in a thread that ends (conftest.py)
pytestmark = pytest.mark.torch_side_thread


def _gguf_reference(path: Path) -> dict:
    """Tensors and vocabulary read with the gguf package's own dequantizer, not through transformers."""
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}

    def dequantized(name: str) -> np.ndarray:
        t = tensors[name]
        return gguf.quants.dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))

    tokens = reader.fields["tokenizer.ggml.tokens"]
    template = reader.fields["tokenizer.chat_template"]
    return {
        "model.embed_tokens.weight": dequantized("token_embd.weight"),
        "model.layers.0.mlp.down_proj.weight": dequantized("blk.0.ffn_down.weight"),
        "model.layers.29.mlp.up_proj.weight": dequantized("blk.29.ffn_up.weight"),
        "model.norm.weight": dequantized("output_norm.weight"),
        "vocab": [bytes(tokens.parts[i]).decode() for i in tokens.data],
        "chat_template": bytes(template.parts[template.data[0]]).decode(),
    }


def test_a_gguf_is_converted_once_and_its_copy_holds_the_same_model(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    source = embedded_model_source()
    gguf_path = Path(source.location) / source.gguf_file
    folder = gguf_cache.copy_folder(gguf_path)
    assert folder.is_relative_to(tmp_path / "chatllm-webui" / "hf")

    # the one conversion (20 s) starts from a damaged copy: one that no longer loads is replaced from the GGUF,
    # not served and not fatal. Its removal leaves the state of a first start, which the session's server covers.
    folder.mkdir(parents=True)
    (folder / gguf_cache.MANIFEST).write_text("{}", encoding="utf-8")
    (folder / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    (folder / "stale.txt").write_text("left by the damaged copy", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="engine.gguf_cache"):
        model, tokenizer, _ = load_model(source, EngineConfig())
    assert "does not load" in caplog.text and "kept a converted copy" in caplog.text
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json", gguf_cache.MANIFEST} <= names
    assert "stale.txt" not in names
    assert not any(".partial-" in p.name for p in folder.parent.iterdir())
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # nothing that unpickles

    # what is served is the GGUF's content, checked against the gguf package's own reading of the file
    reference = _gguf_reference(gguf_path)
    weights = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.29.mlp.up_proj.weight", "model.norm.weight"):
        assert torch.allclose(weights[name], torch.from_numpy(reference[name].astype(np.float32)), atol=1e-6), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert tokenizer.chat_template == reference["chat_template"]
    assert [tokenizer.convert_ids_to_tokens(i) for i in (0, 1, 2, 5, 1000, 49151)] == \
        [reference["vocab"][i] for i in (0, 1, 2, 5, 1000, 49151)]
    assert gguf_cache.stored_sampling(gguf_path) == {}  # the embedded file carries no sampling metadata

    # a later start reads the copy, not the GGUF, and gets the same model
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.gguf_cache"):
        again, again_tokenizer, _ = load_model(source, EngineConfig())
    assert "converted copy" not in caplog.text and "does not load" not in caplog.text
    assert all(torch.equal(weights[k], v) for k, v in again.state_dict().items())
    chat = [{"role": "user", "content": "Hi <|im_end|> 你好"}]
    assert again_tokenizer.apply_chat_template(chat, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, add_generation_prompt=True)
