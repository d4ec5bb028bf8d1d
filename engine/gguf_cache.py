"""A GGUF file read once: its unpacked weights, tokenizer and sampling metadata kept as a plain model folder.

transformers parses a GGUF file's metadata (a 49k-entry vocabulary for the
embedded model) three times per load (config, tokenizer, weights) and then
dequantizes every tensor: ~20 s on two cores before the first answer, at
every start. The same model saved as safetensors + tokenizer.json loads in
under a second, so the first start writes that copy and later starts read it.

The copy is keyed by the GGUF's resolved path, size and modification time; a
changed file gets a new copy. It is written to a private folder and renamed
into place, so a start that dies halfway, or two instances converting at
once, never leave a half copy behind. Everything stored is safetensors or
JSON: no pickle. A copy that no longer loads is rebuilt from the GGUF.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

MANIFEST = "chatllm-gguf.json"
_GIB = 1 << 30


def cache_root() -> Path:
    """Where converted model files live; `XDG_CACHE_HOME` moves it, as for other tools."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chatllm-webui"


def file_key(path: Path) -> str:
    """Names one version of one file without reading it (a multi-GB GGUF would take seconds to hash)."""
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def copy_folder(gguf_path: Path) -> Path:
    return cache_root() / "hf" / f"{gguf_path.stem}-{file_key(gguf_path)}"


def read_manifest(gguf_path: Path) -> Optional[dict[str, Any]]:
    """What the copy of `gguf_path` recorded about it, or None when there is no complete copy."""
    try:
        folder = copy_folder(gguf_path)
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stored_sampling(gguf_path: Path) -> Optional[dict[str, Any]]:
    """The GGUF's `general.sampling.*` values as recorded in its copy (None: no copy, read the file)."""
    manifest = read_manifest(gguf_path)
    sampling = manifest.get("sampling") if manifest else None
    return sampling if isinstance(sampling, dict) else None


def load_through_copy(gguf_path: Path, max_gib: float, load_folder: Callable[[Path], Any],
                      load_gguf: Callable[[], Any], sampling: Callable[[], dict[str, Any]]) -> Any:
    """Load the model of `gguf_path`: from its copy when there is one, else from the GGUF, keeping a copy.

    `load_folder(folder)` and `load_gguf()` return `(model, tokenizer)`; `sampling()` reads the
    GGUF's sampling metadata. With `max_gib` 0, or a model larger than it, no copy is kept.
    """
    if max_gib <= 0:
        return load_gguf()
    folder = copy_folder(gguf_path)
    if (folder / MANIFEST).is_file():
        try:
            return load_folder(folder)
        except Exception as exc:  # a damaged copy is no reason not to start: the GGUF is still there
            log.warning("the converted copy %s does not load (%s); converting %s again", folder, exc, gguf_path.name)
            shutil.rmtree(folder, ignore_errors=True)
    model, tokenizer = load_gguf()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size > max_gib * _GIB:
        log.info("no converted copy of %s kept: %.1f GiB is over --gguf-cache-gb %g", gguf_path.name, size / _GIB, max_gib)
        return model, tokenizer
    started = time.monotonic()
    try:
        _write_copy(folder, model, tokenizer, {"gguf": str(gguf_path.resolve()), "bytes": size, "sampling": sampling()})
    except OSError as exc:  # a read-only or full disk: serve anyway, convert again next time
        log.warning("could not keep a converted copy of %s in %s: %s", gguf_path.name, folder, exc)
        return model, tokenizer
    log.info("kept a converted copy of %s in %s (%.1f s); later starts load it instead",
             gguf_path.name, folder, time.monotonic() - started)
    # serve what later starts will serve, so the first start answers exactly as they do
    del model
    return load_folder(folder)


def _write_copy(folder: Path, model, tokenizer, manifest: dict[str, Any]) -> None:
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        # the weights are unpacked already; the GGUF marker only stops save_pretrained from writing them
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")  # last: marks the copy whole
        try:
            os.rename(partial, folder)
        except OSError:
            if not (folder / MANIFEST).is_file():
                raise
            # another instance finished the same copy first: keep theirs
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
