"""Building the configured engine: the one place that knows the backends."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable

from engine.base import Engine
from engine.config import EngineConfig
from engine.generation_defaults import GENERATION_CONFIG_FILE, GenerationDefaults, load_generation_defaults
from engine.loader import ModelSource, context_length, load_model, resolve_model_source
from engine.prompting import PromptBuilder
from engine.types import ModelLoadError

log = logging.getLogger(__name__)


def _build_transformers(config: EngineConfig, source: ModelSource) -> Engine:
    from engine.prefix_cache import PrefixCache
    from engine.transformers_backend import BatchLimits, TransformersEngine

    if config.max_prefill_tokens < 1:
        raise ModelLoadError(f"--max-prefill-tokens must be at least 1 (got {config.max_prefill_tokens})")
    model, tokenizer, _ = load_model(source, config)
    name = config.served_model_name or source.display_name
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return TransformersEngine(
        model=model,
        tokenizer=tokenizer,
        prompts=PromptBuilder(tokenizer, config.model_type, eos_ids),
        model_name=name,
        max_model_len=context_length(model, tokenizer, config.max_model_len),
        limits=BatchLimits(config.max_num_seqs, config.kv_cache_tokens, config.max_prefill_tokens, config.max_queue),
        prefix_cache=PrefixCache(config.prefix_cache_tokens),
        generation_defaults=model_generation_defaults(config, source),
    )


def model_generation_defaults(config: EngineConfig, source: ModelSource) -> GenerationDefaults:
    """`--generation-config` resolved for this model; logged, since it changes every default answer."""
    model_dir = source.location
    if source.is_hub:
        # the weights were just fetched into the hub cache: its generation_config.json sits beside them
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, GENERATION_CONFIG_FILE)
        model_dir = str(Path(cached).parent) if isinstance(cached, str) else None
    defaults = load_generation_defaults(config.generation_config, model_dir, source.gguf_file, source.display_name)
    log.info("sampling defaults from %s: %s", defaults.source, defaults.values() or "protocol defaults only")
    return defaults


def _build_vllm(config: EngineConfig, source: ModelSource) -> Engine:
    if importlib.util.find_spec("vllm") is None:
        raise ModelLoadError(
            "--backend vllm was asked for, but the vllm package is not installed "
            "(pip install vllm on a CUDA machine), or use --backend transformers"
        )
    raise ModelLoadError("the vllm backend is not available in this version; use --backend transformers")


BACKEND_BUILDERS: dict[str, Callable[[EngineConfig, ModelSource], Engine]] = {
    "transformers": _build_transformers,
    "vllm": _build_vllm,
}


def build_engine(config: EngineConfig) -> Engine:
    """Resolve, load and wrap the model; raises ModelLoadError with one clear sentence."""
    source = resolve_model_source(config.model_path)
    return BACKEND_BUILDERS[config.backend](config, source)
