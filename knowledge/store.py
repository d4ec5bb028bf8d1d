"""One named knowledge base: a LangChain FAISS store on disk plus its manifest.

The manifest records, per file, its sha256 and chunk ids, and for the base the
embedding model, its dimension and the splitter settings, so that an unchanged
upload is a no-op, a changed one replaces its chunks, and a base is never
searched with vectors from a different model.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from knowledge.embeddings import SentenceEmbedder
from knowledge.lexical import BM25Index
from knowledge.persistence import MANIFEST, current_version, read_json, save_version, write_json
from knowledge.splitting import Chunk, SplitterSettings

MANIFEST_FORMAT = 1
RRF_K = 60  # reciprocal-rank-fusion constant, as in the original RRF paper


class KnowledgeBaseError(Exception):
    """A knowledge-base operation that cannot be done; the message says why."""


class EmbeddingMismatchError(KnowledgeBaseError):
    """The base's vectors come from another embedding model."""


class UnknownKnowledgeBaseError(KnowledgeBaseError):
    """No base of that name exists."""


class EmptyKnowledgeBaseError(KnowledgeBaseError):
    """The base exists but holds no documents."""


@dataclass
class FileChunks:
    """A parsed, split and embedded file, ready to go into a base."""

    name: str
    sha256: str
    size: int
    chunks: list[Chunk]
    vectors: np.ndarray


@dataclass
class Hit:
    text: str
    file: str
    page: Optional[int]
    score: float  # cosine similarity of the chunk to the question
    keyword_score: float  # share of the question's terms the chunk contains
    chunk_id: str

    def as_source(self) -> dict:
        return {"file": self.file, "page": self.page, "text": self.text, "score": round(self.score, 4),
                "keyword_score": round(self.keyword_score, 4)}


def _new_faiss(embedder: SentenceEmbedder):
    import faiss
    from langchain_community.docstore.in_memory import InMemoryDocstore
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy

    return FAISS(
        embedding_function=embedder,
        index=faiss.IndexFlatIP(embedder.dimension),
        docstore=InMemoryDocstore(),
        index_to_docstore_id={},
        distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT,
    )


class KnowledgeBase:
    def __init__(self, name: str, folder: Path, embedder: SentenceEmbedder, splitter: SplitterSettings) -> None:
        self.name = name
        self.folder = folder
        self._embedder = embedder
        self._splitter = splitter
        self._lock = threading.RLock()
        self._lexical: Optional[BM25Index] = None
        self.manifest = self._empty_manifest()
        self._vectors = _new_faiss(embedder)
        self._load()

    # ---- state -----------------------------------------------------------------------

    def _empty_manifest(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "embedding": {"model": self._embedder.name, "dimension": self._embedder.dimension},
            "splitter": self._splitter.as_dict(),
            "files": {},
            "updated_at": None,
        }

    def _load(self) -> None:
        version = current_version(self.folder)
        if version is None:
            return
        from langchain_community.vectorstores import FAISS
        from langchain_community.vectorstores.utils import DistanceStrategy

        self.manifest = read_json(version / MANIFEST)
        if self.mismatch() is None:
            # our own files, written by save(); the pickle holds the chunk texts
            self._vectors = FAISS.load_local(
                str(version), self._embedder, allow_dangerous_deserialization=True,
                distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT,
            )

    def mismatch(self) -> Optional[str]:
        """Why this base cannot be used with the running embedding model, or None."""
        built = self.manifest["embedding"]
        if built["model"] == self._embedder.name and built["dimension"] == self._embedder.dimension:
            return None
        return (
            f"knowledge base {self.name!r} was built with embedding model {built['model']} "
            f"({built['dimension']}-d) but the server runs {self._embedder.name} ({self._embedder.dimension}-d); "
            f"rebuild it (POST /api/knowledge/{self.name}/rebuild) or start with "
            f"--embedding-model {built['model']}"
        )

    def _require_usable(self) -> None:
        reason = self.mismatch()
        if reason:
            raise EmbeddingMismatchError(reason)

    @property
    def chunk_count(self) -> int:
        return sum(len(f["chunk_ids"]) for f in self.manifest["files"].values())

    def files(self) -> list[dict]:
        return [
            {"name": name, "sha256": f["sha256"], "size": f["size"], "chunks": len(f["chunk_ids"]),
             "pages": f.get("pages"), "added_at": f["added_at"]}
            for name, f in sorted(self.manifest["files"].items())
        ]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "files": len(self.manifest["files"]),
            "chunks": self.chunk_count,
            "embedding": self.manifest["embedding"],
            "splitter": self.manifest["splitter"],
            "usable": self.mismatch() is None,
            "problem": self.mismatch(),
            "updated_at": self.manifest["updated_at"],
        }

    def file_state(self, name: str, sha256: str) -> str:
        """What an upload of this content would do: added, unchanged or replaced."""
        known = self.manifest["files"].get(name)
        if known is None:
            return "added"
        return "unchanged" if known["sha256"] == sha256 else "replaced"

    # ---- changes ---------------------------------------------------------------------

    def apply(self, new_files: Sequence[FileChunks]) -> None:
        """Add or replace files (old chunks of a replaced file go), then save atomically."""
        self._require_usable()
        with self._lock:
            for item in new_files:
                self._remove_chunks(item.name)
                name_key = hashlib.sha1(item.name.encode("utf-8")).hexdigest()[:8]
                ids = [f"{name_key}-{item.sha256[:16]}-{i}" for i in range(len(item.chunks))]
                self._vectors.add_embeddings(
                    text_embeddings=[(c.text, v) for c, v in zip(item.chunks, item.vectors.tolist())],
                    metadatas=[{"file": item.name, "page": c.page, "heading": c.heading} for c in item.chunks],
                    ids=ids,
                )
                self.manifest["files"][item.name] = {
                    "sha256": item.sha256,
                    "size": item.size,
                    "chunk_ids": ids,
                    "pages": max((c.page or 0 for c in item.chunks), default=0) or None,
                    "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            self._save()

    def delete_file(self, name: str) -> int:
        self._require_usable()
        with self._lock:
            if name not in self.manifest["files"]:
                raise KeyError(name)
            removed = self._remove_chunks(name)
            self._save()
            return removed

    def rebuild(self) -> int:
        """Re-embed every stored chunk with the running model (after a model change)."""
        with self._lock:
            version = current_version(self.folder)
            if version is None:
                self.manifest = self._empty_manifest()
                return 0
            texts = self._stored_texts(version)
            fresh = _new_faiss(self._embedder)
            for name, entry in self.manifest["files"].items():
                docs = [texts[i] for i in entry["chunk_ids"]]
                vectors = self._embedder.encode([d["text"] for d in docs])
                fresh.add_embeddings(
                    text_embeddings=[(d["text"], v) for d, v in zip(docs, vectors.tolist())],
                    metadatas=[d["metadata"] for d in docs],
                    ids=entry["chunk_ids"],
                )
            self._vectors = fresh
            self.manifest["embedding"] = {"model": self._embedder.name, "dimension": self._embedder.dimension}
            self._save()
            return self.chunk_count

    def _stored_texts(self, version: Path) -> dict[str, dict]:
        """Chunk texts from disk, readable whatever model built the vectors."""
        import pickle

        with open(version / "index.pkl", "rb") as fh:
            docstore, _ = pickle.load(fh)  # our own file, written by save_local
        return {i: {"text": d.page_content, "metadata": d.metadata} for i, d in docstore._dict.items()}

    def _remove_chunks(self, name: str) -> int:
        old = self.manifest["files"].pop(name, None)
        if old and old["chunk_ids"]:
            self._vectors.delete(old["chunk_ids"])
        return len(old["chunk_ids"]) if old else 0

    def _save(self) -> None:
        self.manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._lexical = None

        def write(folder: Path) -> None:
            self._vectors.save_local(str(folder))
            write_json(folder / MANIFEST, self.manifest)

        save_version(self.folder, write)

    # ---- search ----------------------------------------------------------------------

    def search(self, query: str, query_vector: np.ndarray, top_k: int) -> list[Hit]:
        """Hybrid retrieval: dense FAISS and BM25 candidates fused by reciprocal rank."""
        self._require_usable()
        with self._lock:
            index = self._vectors.index
            total = index.ntotal
            if total == 0:
                return []
            depth = min(total, max(50, top_k * 10))
            dense_scores, dense_pos = index.search(query_vector.reshape(1, -1).astype(np.float32), depth)
            dense_rank = {int(p): r for r, p in enumerate(dense_pos[0]) if p >= 0}
            dense_score = {int(p): float(s) for s, p in zip(dense_scores[0], dense_pos[0]) if p >= 0}

            lexical = self._lexical_index()
            lex = lexical.scores(query)
            lex_order = [int(p) for p in np.argsort(-lex)[:depth] if lex[p] > 0]
            lex_rank = {p: r for r, p in enumerate(lex_order)}

            fused = {
                p: sum(1.0 / (RRF_K + 1 + ranks[p]) for ranks in (dense_rank, lex_rank) if p in ranks)
                for p in set(dense_rank) | set(lex_rank)
            }
            best = sorted(fused, key=lambda p: -fused[p])[:top_k]
            hits = []
            for pos in best:
                doc_id = self._vectors.index_to_docstore_id[pos]
                doc = self._vectors.docstore.search(doc_id)
                score = dense_score.get(pos)
                if score is None:
                    score = float(np.dot(index.reconstruct(pos), query_vector))
                hits.append(Hit(
                    text=doc.page_content, file=doc.metadata.get("file", "?"), page=doc.metadata.get("page"),
                    score=score, keyword_score=lexical.coverage(query, pos), chunk_id=doc_id,
                ))
            return hits

    def _lexical_index(self) -> BM25Index:
        if self._lexical is None:
            ids = [self._vectors.index_to_docstore_id[i] for i in range(self._vectors.index.ntotal)]
            self._lexical = BM25Index([self._vectors.docstore.search(i).page_content for i in ids])
        return self._lexical
