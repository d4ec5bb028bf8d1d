"""One named knowledge base: a LangChain FAISS store on disk plus its manifest.

The manifest records, per file, its sha256 and chunk ids, and for the base the
embedding model, its dimension and the splitter settings, so that an unchanged
upload is a no-op, a changed one replaces its chunks, and a base is never
searched with vectors from a different model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from knowledge.embeddings import Embedder
from knowledge.folder_lock import folder_lock
from knowledge.lexical import BM25Index, fuse
from knowledge.persistence import (
    StoredVersion,
    StoreFormatError,
    current_version,
    read_chunks,
    read_version,
    save_version,
    write_version_files,
)
from knowledge.splitting import Chunk, SplitterSettings

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 2  # 2: chunks in JSON and the index through faiss.write_index (1 pickled them)


class KnowledgeBaseError(Exception):
    """A knowledge-base operation that cannot be done; the message says why."""


class EmbeddingMismatchError(KnowledgeBaseError):
    """The base's vectors come from another embedding model."""


class UnknownKnowledgeBaseError(KnowledgeBaseError):
    """No base of that name exists."""


class EmptyKnowledgeBaseError(KnowledgeBaseError):
    """The base exists but holds no documents."""


class UnusableKnowledgeBaseError(KnowledgeBaseError):
    """The base's files on disk cannot be loaded (an old format, damage); the message says what to do."""


class KnowledgeStoreUnavailableError(KnowledgeBaseError):
    """The vector store (a Milvus server) cannot be reached or failed; retry later."""


class KnowledgeBaseDeletedError(KnowledgeBaseError):
    """The base was deleted while this operation waited for it."""


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


def _new_faiss(embedder: Embedder, stored: Optional[StoredVersion] = None):
    """LangChain's FAISS store over a flat inner-product index: empty, or holding a stored version."""
    import faiss
    from langchain_community.docstore.in_memory import InMemoryDocstore
    from langchain_community.vectorstores import FAISS
    from langchain_community.vectorstores.utils import DistanceStrategy
    from langchain_core.documents import Document

    chunks = stored.chunks if stored else []
    return FAISS(
        embedding_function=embedder,
        index=stored.index if stored else faiss.IndexFlatIP(embedder.dimension),
        docstore=InMemoryDocstore({c["id"]: Document(page_content=c["text"], metadata=c["metadata"]) for c in chunks}),
        index_to_docstore_id={i: c["id"] for i, c in enumerate(chunks)},
        distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT,
    )


class KnowledgeBase:
    def __init__(self, name: str, folder: Path, embedder: Embedder, splitter: SplitterSettings) -> None:
        self.name = name
        self.folder = folder
        self._embedder = embedder
        self._splitter = splitter
        # one writer at a time; deletion takes it too, so nothing is saved into a deleted folder
        self._lock = threading.RLock()
        self.deleted = False
        self._lexical: Optional[BM25Index] = None
        self.manifest = self._empty_manifest()
        self._vectors = _new_faiss(embedder)
        self.problem: Optional[str] = None  # why the stored files cannot be loaded
        self.version: Optional[str] = None  # the version folder in memory; another instance may save a newer one
        try:
            self._load()
        except StoreFormatError as exc:
            # listed as unusable with the reason, so it can be seen and deleted, not silently skipped
            self.problem = str(exc)

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
        """State from the version on disk (or empty); also how a failed change is rolled back."""
        self._lexical = None
        version = current_version(self.folder)
        self.version = version.name if version is not None else None
        if version is None:
            self.manifest, self._vectors = self._empty_manifest(), _new_faiss(self._embedder)
            return
        stored = read_version(version, self.name)
        self.manifest = stored.manifest
        # a base built with another model keeps its chunks on disk until /rebuild
        self._vectors = _new_faiss(self._embedder, stored if self.mismatch() is None else None)

    def refresh(self) -> None:
        """Load the newest saved version if another instance (or process) saved one since ours."""
        on_disk = current_version(self.folder)
        if (on_disk.name if on_disk is not None else None) == self.version:
            return
        with self._lock:
            on_disk = current_version(self.folder)
            if (on_disk.name if on_disk is not None else None) == self.version or self.deleted:
                return
            log.info("knowledge base %r: loading version %s saved elsewhere", self.name,
                     on_disk.name if on_disk is not None else "(none)")
            try:
                self._load()
                self.problem = None
            except StoreFormatError as exc:
                self.problem = str(exc)

    def mismatch(self) -> Optional[str]:
        """Why this base cannot be used with the running embedding model, or None."""
        if self.problem:
            return self.problem
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
        if self.problem:
            raise UnusableKnowledgeBaseError(self.problem)
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
        with self._changing():
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
        with self._changing():
            if name not in self.manifest["files"]:
                raise KeyError(name)
            removed = self._remove_chunks(name)
            self._save()
            return removed

    def rebuild(self) -> int:
        """Re-embed every stored chunk with the running model (after a model change)."""
        with self._changing(require_usable=False):
            if self.problem:
                raise UnusableKnowledgeBaseError(self.problem)
            version = current_version(self.folder)
            if version is None:
                self.manifest = self._empty_manifest()
                return 0
            texts = {c["id"]: c for c in read_chunks(version, self.name)}
            fresh = _new_faiss(self._embedder)
            for entry in self.manifest["files"].values():
                docs = [texts[i] for i in entry["chunk_ids"]]
                vectors = self._embedder.encode([d["text"] for d in docs])
                fresh.add_embeddings(
                    text_embeddings=[(d["text"], v) for d, v in zip(docs, vectors.tolist())],
                    metadatas=[d["metadata"] for d in docs],
                    ids=entry["chunk_ids"],
                )
            self._vectors = fresh
            self.manifest["embedding"] = {"model": self._embedder.name, "dimension": self._embedder.dimension}
            self.manifest["format"] = MANIFEST_FORMAT
            self._save()
            return self.chunk_count

    @contextlib.contextmanager
    def _changing(self, require_usable: bool = True) -> Iterator[None]:
        """Hold the base for a change; if it fails, memory goes back to what is on disk."""
        if require_usable:
            self._require_usable()
        # the thread lock for this process, the folder lock for other instances on the same folder
        with self._lock, folder_lock(self.folder):
            if self.deleted:
                raise KnowledgeBaseDeletedError(f"knowledge base {self.name!r} was deleted")
            self.refresh()  # change the newest version, not a stale copy: no instance's upload is lost
            if require_usable:
                self._require_usable()
            try:
                yield
            except BaseException:
                try:
                    self._load()  # the old version is still the one on disk
                except Exception as exc:
                    log.error("knowledge base %r could not be reloaded after a failed change: %s", self.name, exc)
                    self.problem = str(exc)
                raise

    def check_writable(self) -> None:
        """Raise now what a change would raise later (another embedding model, unreadable files, deleted)."""
        self._require_usable()
        if self.deleted:
            raise KnowledgeBaseDeletedError(f"knowledge base {self.name!r} was deleted")

    def mark_deleted(self) -> None:
        """Called with the folder about to go: waits for a change in progress, refuses later ones."""
        with self._lock:
            self.deleted = True

    def _remove_chunks(self, name: str) -> int:
        old = self.manifest["files"].pop(name, None)
        if old and old["chunk_ids"]:
            self._vectors.delete(old["chunk_ids"])
        return len(old["chunk_ids"]) if old else 0

    def _save(self) -> None:
        self.manifest["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._lexical = None
        docstore, positions = self._vectors.docstore, self._vectors.index_to_docstore_id
        chunks = []
        for position in range(self._vectors.index.ntotal):
            doc = docstore.search(positions[position])
            chunks.append({"id": positions[position], "text": doc.page_content, "metadata": doc.metadata})
        saved = save_version(self.folder, lambda folder: write_version_files(folder, self.manifest, self._vectors.index,
                                                                             chunks))
        self.version = saved.name

    # ---- search ----------------------------------------------------------------------

    def search(self, query: str, query_vector: np.ndarray, top_k: int) -> list[Hit]:
        """Hybrid retrieval: dense FAISS and BM25 candidates fused by reciprocal rank (on the version in memory:
        the service refreshes a base when it hands it out)."""
        self._require_usable()
        with self._lock:
            index = self._vectors.index
            total = index.ntotal
            if total == 0:
                return []
            depth = min(total, max(50, top_k * 10))
            dense_scores, dense_pos = index.search(query_vector.reshape(1, -1).astype(np.float32), depth)
            dense_score = {int(p): float(s) for s, p in zip(dense_scores[0], dense_pos[0]) if p >= 0}
            lexical = self._lexical_index()
            best = fuse(dense_pos[0], lexical.scores(query), depth, top_k)
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
