"""Building the configured engine: the one place that knows the backends."""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

from engine.base import Engine
from engine.config import EngineConfig
from engine.generation_defaults import GENERATION_CONFIG_FILE, GenerationDefaults, load_generation_defaults
from engine.loader import ModelSource, context_length, load_model, resolve_model_source
from engine.prompting import PromptBuilder
from engine.types import ModelLoadError

log = logging.getLogger(__name__)

ENGINE_KEY_ENV = "CHATLLM_ENGINE_API_KEY"


def _build_transformers(config: EngineConfig, source: ModelSource) -> Engine:
    from engine.prefix_cache import PrefixCache
    from engine.sequences import BatchLimits
    from engine.transformers_backend import TransformersEngine

    if not 0 <= config.join_mid_pass <= 1:
        raise ModelLoadError(f"--join-mid-pass must be between 0 and 1 (got {config.join_mid_pass})")
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
        limits=BatchLimits(config.max_num_seqs, config.kv_cache_tokens or BatchLimits.kv_cache_tokens,
                           config.max_prefill_tokens, config.max_queue, config.join_mid_pass),
        prefix_cache=PrefixCache(config.prefix_cache_tokens),
        generation_defaults=model_generation_defaults(config, source),
        fused_step=config.fused_step == "auto",
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


def _build_openai(config: EngineConfig) -> Engine:
    from engine.remote_connect import connect_remote

    if not config.engine_url:
        raise ModelLoadError("--backend openai needs --engine-url, the inference server's OpenAI base URL "
                             "(e.g. http://127.0.0.1:8001/v1)")
    return connect_remote(_remote_settings(config, config.engine_url.rstrip("/"), 60.0), config.generation_config)


def _build_vllm(config: EngineConfig) -> Engine:
    from engine.remote_connect import connect_remote
    from engine.supervisor import EngineProcess

    port = free_loopback_port()
    process = EngineProcess(engine_command(config, port))
    process.start()
    try:
        engine = connect_remote(_remote_settings(config, f"http://127.0.0.1:{port}/v1", 1800.0),
                                config.generation_config, alive=process.exit_reason)
    except BaseException:
        process.stop()
        raise
    engine.process = process
    return engine


def engine_command(config: EngineConfig, port: int) -> list[str]:
    """The supervised engine's argv: --engine-command with {port} filled in, or `vllm serve` with our settings."""
    if config.engine_command:
        if "{port}" not in config.engine_command:
            raise ModelLoadError("--engine-command must say where the internal port goes with {port}, "
                                 "e.g. \"vllm serve Qwen/Qwen2-7B-Instruct --port {port}\"")
        return [part.replace("{port}", str(port)) for part in shlex.split(config.engine_command)]
    vllm = shutil.which("vllm") or str(Path(sys.executable).parent / "vllm")
    if importlib.util.find_spec("vllm") is None or not Path(vllm).exists():
        raise ModelLoadError(
            "--backend vllm starts `vllm serve`, but vLLM is not installed here: pip install vllm (it needs an "
            "NVIDIA GPU with CUDA); or run vLLM yourself and use --backend openai --engine-url, or give "
            "--engine-command"
        )
    if not config.model_path:
        raise ModelLoadError("--backend vllm needs --model-path: a hub id such as Qwen/Qwen2-7B-Instruct or a model "
                             "directory")
    argv = [vllm, "serve", config.model_path, "--host", "127.0.0.1", "--port", str(port)]
    if config.served_model_name:
        argv += ["--served-model-name", config.served_model_name]
    if config.max_model_len:
        argv += ["--max-model-len", str(config.max_model_len)]
    if config.trust_remote_code:
        argv.append("--trust-remote-code")
    if config.precision in ("fp16", "bf16", "fp32"):
        argv += ["--dtype", {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[config.precision]]
    return argv + shlex.split(config.engine_args)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remote_settings(config: EngineConfig, url: str, default_wait: float):
    from engine.remote import RemoteSettings

    return RemoteSettings(
        url=url,
        api_key=config.engine_api_key or os.environ.get(ENGINE_KEY_ENV) or None,
        model=config.engine_model or config.served_model_name,
        max_model_len=config.max_model_len,
        timeout=config.engine_timeout,
        retries=max(0, config.engine_retries),
        wait=config.engine_wait if config.engine_wait is not None else default_wait,
    )


def _build_llamacpp(config: EngineConfig) -> Engine:
    from engine.llamacpp_server import build_llamacpp

    return build_llamacpp(config)


BACKEND_BUILDERS: dict[str, Callable[[EngineConfig], Engine]] = {
    "transformers": lambda config: _build_transformers(config, resolve_model_source(config.model_path)),
    "llamacpp": _build_llamacpp,
    "openai": _build_openai,
    "vllm": _build_vllm,
}


def build_engine(config: EngineConfig) -> Engine:
    """Resolve, load and wrap the model; raises ModelLoadError with one clear sentence."""
    return BACKEND_BUILDERS[config.backend](config)
