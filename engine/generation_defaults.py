"""The model's own sampling defaults, for the fields a request leaves out.

Model authors publish the settings their model was tuned for: Hugging Face
models in `generation_config.json`, GGUF files under `general.sampling.*`.
A small table covers models whose files carry none, the embedded one first.
Its card recommends temperature 0.2 and top_p 0.9, but the 4-bit file is
flatter than the original ("The" 0.15 vs "L" 0.14 as the first token of
"What is the capital of France?"): on eight factual questions x 10 samples
0.2/0.9 answered 74/80 and the France question 6/10, 0.2/0.5 answered 80/80
(bench/README.md, "Default sampling"). The protocol's 0.95/0.8 makes it ramble.
`--generation-config` chooses where they come from, as in vLLM:
`auto` (the model's own), `none` (protocol defaults only) or a directory
holding a `generation_config.json`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from engine.types import ModelLoadError

log = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
_MAX_CONFIG_BYTES = 1 << 20

#: GGUF metadata key -> field (the keys llama.cpp's converter writes)
_GGUF_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.penalty_repeat": "repetition_penalty",
}

#: models whose files carry no defaults, by served name: their cards' recommendations
RECOMMENDED = {
    "SmolLM2-135M-Instruct": {"temperature": 0.2, "top_p": 0.5},  # measured on the embedded 4-bit file
    "SmolLM2-360M-Instruct": {"temperature": 0.2, "top_p": 0.9},
    "SmolLM2-1.7B-Instruct": {"temperature": 0.2, "top_p": 0.9},
}


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling values the model asks for; None where it says nothing."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    max_new_tokens: Optional[int] = None
    source: str = "none"

    def get(self, name: str, fallback: Any) -> Any:
        value = getattr(self, name)
        return fallback if value is None else value

    def for_field(self, request: Any, name: str) -> Any:
        """A pydantic request's field: exactly as sent, else the model's default, else the schema's."""
        sent = getattr(request, name)
        return sent if name in request.model_fields_set else self.get(name, sent)

    def values(self) -> dict[str, Any]:
        """The fields the model sets (for /health and the log)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "source" and getattr(self, f.name) is not None}


# a value outside these is a broken file, not a preference: ignored with a warning
_VALID = {
    "temperature": lambda v: 0.0 <= v <= 100.0,
    "top_p": lambda v: 0.0 < v <= 1.0,
    "top_k": lambda v: 0 <= v <= 1_000_000,
    "repetition_penalty": lambda v: 0.01 <= v <= 100.0,
    "max_new_tokens": lambda v: 1 <= v <= 1 << 20,
}


def _checked(raw: dict[str, Any], source: str) -> GenerationDefaults:
    values: dict[str, Any] = {}
    for name, value in raw.items():
        integer = name in ("top_k", "max_new_tokens")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            log.warning("ignoring %s=%r from %s: not a number", name, value, source)
            continue
        value = int(value) if integer and float(value).is_integer() else value
        if integer and not isinstance(value, int):
            log.warning("ignoring %s=%r from %s: not an integer", name, value, source)
            continue
        if not _VALID[name](value):
            log.warning("ignoring %s=%r from %s: out of range", name, value, source)
            continue
        values[name] = float(value) if not integer else value
    return GenerationDefaults(**values, source=source)


def from_generation_config(path: Path) -> GenerationDefaults:
    """The sampling fields of a `generation_config.json` (other keys are the model's business)."""
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ModelLoadError(f"{path} is larger than {_MAX_CONFIG_BYTES} bytes; not a generation config")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"could not read the generation config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"the generation config {path} is not a JSON object")
    raw = {name: data[name] for name in _VALID if name in data}
    return _checked(raw, str(path))


def gguf_sampling(path: Path) -> dict:
    """The raw `general.sampling.*` values of a GGUF file (unchecked; empty when it has none)."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # a file transformers could load but this reader cannot is no reason to stop
        log.warning("could not read sampling metadata from %s: %s", path, exc)
        return {}
    raw = {}
    for key, name in _GGUF_KEYS.items():
        field = reader.fields.get(key)
        if field is not None and field.data:
            raw[name] = field.parts[field.data[0]].tolist()[0]
    return raw


def from_gguf(path: Path) -> GenerationDefaults:
    """The sampling metadata of a GGUF file, if its author wrote any (from its converted copy when there is one:
    reading the file's metadata takes seconds)."""
    from engine.gguf_cache import stored_sampling

    raw = stored_sampling(path)
    if raw is None:
        raw = gguf_sampling(path)
    return _checked(raw, f"{path} metadata") if raw else GenerationDefaults()


def load_generation_defaults(setting: str, model_dir: Optional[str], gguf_file: Optional[str], model_name: str) -> GenerationDefaults:
    """Resolve `--generation-config` for one model: `auto`, `none`, or a directory."""
    if setting == "none":
        return GenerationDefaults()
    if setting != "auto":
        folder = Path(setting).expanduser()
        config = folder / GENERATION_CONFIG_FILE if folder.is_dir() else folder
        if not config.is_file():
            raise ModelLoadError(f"--generation-config {setting}: no {GENERATION_CONFIG_FILE} there")
        return from_generation_config(config)
    if model_dir:
        if gguf_file:
            found = from_gguf(Path(model_dir) / gguf_file)
            if found.values():
                return found
        elif (Path(model_dir) / GENERATION_CONFIG_FILE).is_file():
            return from_generation_config(Path(model_dir) / GENERATION_CONFIG_FILE)
    if model_name in RECOMMENDED:
        return _checked(RECOMMENDED[model_name], f"recommended settings for {model_name}")
    return GenerationDefaults()
