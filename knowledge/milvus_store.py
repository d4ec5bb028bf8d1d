"""Knowledge bases in Milvus: one collection of chunks per base, plus a catalog collection of bases and files.

Every instance pointed at the same Milvus sees the same bases. The catalog is
the truth: a file's chunks count only once its catalog row names them, so a
change that fails half-way leaves unreferenced rows that searches ignore, never
a half-replaced file. Retrieval is the same hybrid as with FAISS: Milvus gives
the dense ranking, BM25 runs here over the base's chunk texts (loaded once per
revision), and the two are fused by reciprocal rank.

A `*.db` URI runs Milvus Lite inside this process (one process per file);
`http://host:19530` reaches a Milvus server or cluster, for many instances.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from typing import Optional, Sequence

import numpy as np

from knowledge.embeddings import Embedder
from knowledge.lexical import BM25Index, fuse
from knowledge.splitting import SplitterSettings
from knowledge.store import (
    MANIFEST_FORMAT,
    EmbeddingMismatchError,
    FileChunks,
    Hit,
    KnowledgeBaseDeletedError,
    KnowledgeBaseError,
    KnowledgeStoreUnavailableError,
)

log = logging.getLogger(__name__)

MAX_TEXT = 65535  # Milvus VARCHAR limit, in bytes: chunks are far shorter (--chunk-size characters)
PAGE_SIZE = 1000


def _literal(value: str) -> str:
    """A quoted string literal for a Milvus filter. Names reaching here are checked knowledge-base names (no
    quotes or backslashes); the escaping is a second line. Milvus reads UTF-8 as is, not \\u escapes."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Guarded:
    """The Milvus client, its failures turned into one error the API answers with 503 (not a 500)."""

    def __init__(self, client, uri: str) -> None:
        self._client = client
        self._uri = uri

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def call(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            except Exception as exc:
                if type(exc).__module__.startswith("pymilvus") or isinstance(exc, (ConnectionError, TimeoutError)):
                    raise KnowledgeStoreUnavailableError(f"Milvus at {self._uri} failed: {str(exc)[:300]}") from None
                raise
        return call


class MilvusCatalog:
    def __init__(self, uri: str, token: Optional[str], prefix: str, embedder: Embedder,
                 settings: SplitterSettings) -> None:
        from pymilvus import DataType, MilvusClient

        self.uri = uri
        self.prefix = prefix
        self.embedder = embedder
        self.settings = settings
        try:
            self.client = _Guarded(MilvusClient(uri=uri, token=token or ""), uri)
        except Exception as exc:
            raise KnowledgeBaseError(f"Milvus at {uri} could not be opened: {exc}") from None
        self.table = f"{prefix}_catalog"
        if not self.client.has_collection(self.table):
            schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
            schema.add_field("kb", DataType.VARCHAR, max_length=256)
            schema.add_field("kind", DataType.VARCHAR, max_length=8)
            schema.add_field("data", DataType.VARCHAR, max_length=MAX_TEXT)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants one; never searched
            index = self.client.prepare_index_params()
            index.add_index("vector", index_type="FLAT", metric_type="L2")
            self.client.create_collection(self.table, schema=schema, index_params=index)

    def describe(self) -> str:
        return f"Milvus {self.uri}"

    def names(self) -> set[str]:
        rows = self.client.query(self.table, filter='kind == "base"', output_fields=["kb"], limit=16384)
        return {r["kb"] for r in rows}

    def saved(self, name: str) -> bool:
        return bool(self.client.get(self.table, ids=[f"base:{name}"], output_fields=["kb"]))

    def open(self, name: str) -> "MilvusKnowledgeBase":
        return MilvusKnowledgeBase(name, self, self.embedder, self.settings)

    def remove(self, base: "MilvusKnowledgeBase") -> None:
        self.client.delete(self.table, filter=f"kb == {_literal(base.name)}")
        if self.client.has_collection(base.collection):
            self.client.drop_collection(base.collection)

    def close(self) -> None:
        self.client.close()

    # ---- rows ------------------------------------------------------------------------

    def read(self, name: str) -> tuple[Optional[dict], dict[str, dict]]:
        """The base row's data and its files, by file name."""
        rows = self.client.query(self.table, filter=f"kb == {_literal(name)}", output_fields=["kind", "data"],
                                 limit=16384)
        base, files = None, {}
        for row in rows:
            data = json.loads(row["data"])
            if row["kind"] == "base":
                base = data
            else:
                files[data["name"]] = data
        return base, files

    def revision(self, name: str) -> Optional[str]:
        rows = self.client.get(self.table, ids=[f"base:{name}"], output_fields=["data"])
        return json.loads(rows[0]["data"])["revision"] if rows else None

    def put(self, name: str, kind: str, key: str, data: dict) -> None:
        self.client.upsert(self.table, [{"id": f"{kind}:{name}" + (f":{key}" if key else ""), "kb": name,
                                         "kind": kind, "data": json.dumps(data, ensure_ascii=False),
                                         "vector": [0.0, 0.0]}])

    def drop_file(self, name: str, file_name: str) -> None:
        self.client.delete(self.table, ids=[f"file:{name}:{_file_key(file_name)}"])


def _cut(text: str, max_bytes: int) -> str:
    """At most `max_bytes` of UTF-8 (Milvus VARCHAR lengths are bytes), never splitting a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")


def _file_key(file_name: str) -> str:
    return hashlib.sha1(file_name.encode("utf-8")).hexdigest()


class MilvusKnowledgeBase:
    """The same interface as the FAISS `KnowledgeBase`, over Milvus collections."""

    folder = None  # nothing on local disk

    def __init__(self, name: str, catalog: MilvusCatalog, embedder: Embedder, splitter: SplitterSettings) -> None:
        self.name = name
        self.catalog = catalog
        self.client = catalog.client
        self.collection = f"{catalog.prefix}_kb_{hashlib.sha1(name.encode('utf-8')).hexdigest()[:20]}"
        self._embedder = embedder
        self._splitter = splitter
        self._lock = threading.RLock()
        self.deleted = False
        self.problem: Optional[str] = None
        self.version: Optional[str] = None  # the catalog revision in memory
        self.manifest = self._empty_manifest()
        self._chunks: list[dict] = []  # referenced chunks, in a fixed order: BM25 positions
        self._lexical: Optional[BM25Index] = None
        self._load()

    # ---- state ------------------------------------------------------------------------

    def _empty_manifest(self) -> dict:
        return {"format": MANIFEST_FORMAT, "name": self.name,
                "embedding": {"model": self._embedder.name, "dimension": self._embedder.dimension},
                "splitter": self._splitter.as_dict(), "files": {}, "updated_at": None}

    def _load(self) -> None:
        base, files = self.catalog.read(self.name)
        self._lexical = None
        if base is None:
            self.version, self.manifest, self._chunks = None, self._empty_manifest(), []
            return
        self.version = base["revision"]
        self.manifest = {"format": base.get("format", MANIFEST_FORMAT), "name": self.name,
                         "embedding": base["embedding"], "splitter": base.get("splitter", {}),
                         "updated_at": base.get("updated_at"), "files": {}}
        for file_name, entry in files.items():
            entry = dict(entry)
            entry["chunk_ids"] = [f"{entry['id_prefix']}-{i}" for i in range(entry["chunks"])]
            self.manifest["files"][file_name] = entry
        wanted = {i for f in self.manifest["files"].values() for i in f["chunk_ids"]}
        rows = self._all_rows() if wanted and self.client.has_collection(self.collection) else []
        self._chunks = sorted((r for r in rows if r["id"] in wanted), key=lambda r: r["id"])

    def _all_rows(self) -> list[dict]:
        out, iterator = [], self.client.query_iterator(self.collection, batch_size=PAGE_SIZE, filter="",
                                                       output_fields=["id", "text", "file", "page", "heading"])
        try:
            while batch := iterator.next():
                out.extend(batch)
        finally:
            iterator.close()
        return out

    def refresh(self) -> None:
        if self.deleted:
            return
        revision = self.catalog.revision(self.name)
        if revision == self.version:
            return
        with self._lock:
            if self.catalog.revision(self.name) != self.version:
                log.info("knowledge base %r: loading revision %s from Milvus", self.name, revision)
                self._load()

    def mismatch(self) -> Optional[str]:
        built = self.manifest["embedding"]
        if built["model"] == self._embedder.name and built["dimension"] == self._embedder.dimension:
            return None
        return (f"knowledge base {self.name!r} was built with embedding model {built['model']} ({built['dimension']}-d) "
                f"but the server runs {self._embedder.name} ({self._embedder.dimension}-d); rebuild it "
                f"(POST /api/knowledge/{self.name}/rebuild) or start with --embedding-model {built['model']}")

    @property
    def chunk_count(self) -> int:
        return sum(f["chunks"] for f in self.manifest["files"].values())

    def files(self) -> list[dict]:
        return [{"name": name, "sha256": f["sha256"], "size": f["size"], "chunks": f["chunks"], "pages": f.get("pages"),
                 "added_at": f["added_at"]} for name, f in sorted(self.manifest["files"].items())]

    def summary(self) -> dict:
        return {"name": self.name, "files": len(self.manifest["files"]), "chunks": self.chunk_count,
                "embedding": self.manifest["embedding"], "splitter": self.manifest["splitter"],
                "usable": self.mismatch() is None, "problem": self.mismatch(), "updated_at": self.manifest["updated_at"]}

    def file_state(self, name: str, sha256: str) -> str:
        known = self.manifest["files"].get(name)
        if known is None:
            return "added"
        return "unchanged" if known["sha256"] == sha256 else "replaced"

    def check_writable(self) -> None:
        if self.mismatch():
            raise EmbeddingMismatchError(self.mismatch())
        if self.deleted:
            raise KnowledgeBaseDeletedError(f"knowledge base {self.name!r} was deleted")

    def mark_deleted(self) -> None:
        with self._lock:
            self.deleted = True

    # ---- changes ------------------------------------------------------------------------

    def _ensure_collection(self) -> None:
        from pymilvus import DataType

        if self.client.has_collection(self.collection):
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=128)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self._embedder.dimension)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("file", DataType.VARCHAR, max_length=1024)
        schema.add_field("page", DataType.INT64)
        schema.add_field("heading", DataType.VARCHAR, max_length=1024)
        index = self.client.prepare_index_params()
        # vectors are normalised: inner product is cosine, as with FAISS IndexFlatIP
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        self.client.create_collection(self.collection, schema=schema, index_params=index)

    def _changed(self) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.catalog.put(self.name, "base", "", {"revision": uuid.uuid4().hex, "format": MANIFEST_FORMAT,
                                                 "embedding": self.manifest["embedding"],
                                                 "splitter": self.manifest["splitter"], "updated_at": now})
        self._load()

    def _begin(self) -> None:
        if self.deleted:
            raise KnowledgeBaseDeletedError(f"knowledge base {self.name!r} was deleted")
        self.refresh()
        self.check_writable()

    def apply(self, new_files: Sequence[FileChunks]) -> None:
        with self._lock:
            self._begin()
            self._ensure_collection()
            for item in new_files:
                id_prefix = f"{_file_key(item.name)[:8]}-{item.sha256[:16]}"
                rows = [{"id": f"{id_prefix}-{i}", "vector": v, "text": _cut(c.text, MAX_TEXT),
                         "file": _cut(item.name, 1024), "page": int(c.page or 0), "heading": _cut(c.heading or "", 1024)}
                        for i, (c, v) in enumerate(zip(item.chunks, item.vectors.tolist()))]
                for start in range(0, len(rows), PAGE_SIZE):
                    self.client.upsert(self.collection, rows[start:start + PAGE_SIZE])
                old = self.manifest["files"].get(item.name)
                # the new chunks first, then the catalog row that names them, then the old chunks go
                self.catalog.put(self.name, "file", _file_key(item.name), {
                    "name": item.name, "sha256": item.sha256, "size": item.size, "chunks": len(rows),
                    "id_prefix": id_prefix, "pages": max((c.page or 0 for c in item.chunks), default=0) or None,
                    "added_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                if old is not None and old["id_prefix"] != id_prefix:
                    self.client.delete(self.collection, ids=old["chunk_ids"])
            self._changed()

    def delete_file(self, name: str) -> int:
        with self._lock:
            self._begin()
            old = self.manifest["files"].get(name)
            if old is None:
                raise KeyError(name)
            self.catalog.drop_file(self.name, name)
            if old["chunk_ids"]:
                self.client.delete(self.collection, ids=old["chunk_ids"])
            self._changed()
            return old["chunks"]

    def rebuild(self) -> int:
        """Re-embed every chunk with the running model, into a fresh collection of its dimension."""
        with self._lock:
            if self.deleted:
                raise KnowledgeBaseDeletedError(f"knowledge base {self.name!r} was deleted")
            self.refresh()
            chunks = list(self._chunks)
            if self.client.has_collection(self.collection):
                self.client.drop_collection(self.collection)
            self.manifest["embedding"] = {"model": self._embedder.name, "dimension": self._embedder.dimension}
            self._ensure_collection()
            for start in range(0, len(chunks), 256):
                batch = chunks[start:start + 256]
                vectors = self._embedder.encode([c["text"] for c in batch])
                self.client.insert(self.collection, [{**c, "vector": v} for c, v in zip(batch, vectors.tolist())])
            self._changed()
            return self.chunk_count

    # ---- search -------------------------------------------------------------------------

    def search(self, query: str, query_vector: np.ndarray, top_k: int) -> list[Hit]:
        if self.mismatch():
            raise EmbeddingMismatchError(self.mismatch())
        with self._lock:
            chunks = self._chunks
            if not chunks:
                return []
            position = {c["id"]: i for i, c in enumerate(chunks)}
            depth = min(len(chunks), max(50, top_k * 10))
            found = self.client.search(self.collection, data=[query_vector.astype(np.float32).tolist()], limit=depth,
                                       search_params={"metric_type": "IP"}, output_fields=[])[0]
            dense = [(position[h["id"]], float(h["distance"])) for h in found if h["id"] in position]
            dense_score = dict(dense)
            if self._lexical is None:
                self._lexical = BM25Index([c["text"] for c in chunks])
            best = fuse([p for p, _ in dense], self._lexical.scores(query), depth, top_k)
            missing = [chunks[p]["id"] for p in best if p not in dense_score]
            if missing:  # found by keywords alone: their cosine still decides relevance
                for row in self.client.get(self.collection, ids=missing, output_fields=["vector"]):
                    dense_score[position[row["id"]]] = float(np.dot(np.asarray(row["vector"], np.float32), query_vector))
            return [Hit(text=chunks[p]["text"], file=chunks[p]["file"], page=chunks[p]["page"] or None,
                        score=dense_score.get(p, 0.0), keyword_score=self._lexical.coverage(query, p),
                        chunk_id=chunks[p]["id"]) for p in best]
