"""The knowledge bases of one server: ingestion jobs, retrieval, and the RAG prompt."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from knowledge.config import KnowledgeConfig
from knowledge.embeddings import Embedder
from knowledge.catalog import FolderCatalog
from knowledge.jobs import FileResult, Job, JobRegistry
from knowledge.loaders import LoaderError
from knowledge.names import check_kb_name
from knowledge.rag_prompt import RagPrompt
from knowledge.sandbox import ParseCancelled, ParserSandbox, ParseTimedOut
from knowledge.splitting import SplitterSettings
from knowledge.store import (
    EmptyKnowledgeBaseError,
    FileChunks,
    Hit,
    KnowledgeBase,
    KnowledgeBaseDeletedError,
    KnowledgeBaseError,
    UnknownKnowledgeBaseError,
)
from metrics.counters import Tally

log = logging.getLogger(__name__)


def build_catalog(config: KnowledgeConfig, embedder: Embedder, settings: SplitterSettings):
    """The configured store: a folder of FAISS versions, or Milvus (Lite in a file, or a server)."""
    root = Path(config.knowledge_dir or "data/knowledge").expanduser().resolve()
    if config.vector_store == "milvus":
        from knowledge.milvus_store import MilvusCatalog

        uri = config.milvus_uri or str(root / "milvus.db")
        if "://" not in uri:  # a Milvus Lite file
            path = Path(uri).expanduser().resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            uri = str(path)
        return MilvusCatalog(uri, config.milvus_token, config.milvus_collection_prefix, embedder, settings)
    return FolderCatalog(root, embedder, settings)


class IngestQueueFullError(Exception):
    """Too many upload jobs are queued or running; the client should retry later."""

    retry_after = 30


class _Stop(Exception):
    """A job checkpoint found the job cancelled or out of time."""

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state


@dataclass(frozen=True)
class Upload:
    name: str  # already sanitised
    data: bytes


@dataclass
class Retrieval:
    """What a grounded answer is built from."""

    hits: list[Hit]  # relevant chunks, best first
    prompt: Optional[str]  # the RAG prompt, or None when nothing relevant was found
    no_match_reply: Optional[str]


class KnowledgeService:
    def __init__(self, config: KnowledgeConfig, embedder: Embedder) -> None:
        self.config = config
        self.embedder = embedder
        self.settings = SplitterSettings(config.chunk_size, config.chunk_overlap)
        self.rag_prompt = RagPrompt(config.rag_prompt_file)
        self.catalog = build_catalog(config, embedder, self.settings)
        self.jobs = JobRegistry()
        self.counters = Tally()  # files, chunks, seconds, jobs: read by /metrics
        self._futures: dict[str, concurrent.futures.Future] = {}
        self._submit_lock = threading.Lock()
        self._bases: dict[str, KnowledgeBase] = {}
        self._bases_lock = threading.Lock()
        # one ingestion at a time: embedding is CPU-bound and shares the machine with the model
        self._ingest = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        # untrusted files are parsed in a child process with memory and time limits
        self._sandbox = ParserSandbox(config.parse_limits(), self.settings, config.max_chunks_per_file,
                                      config.parser_memory_mb)
        for name in sorted(self.catalog.names()):
            try:
                self._bases[check_kb_name(name)] = self.catalog.open(name)
            except Exception as exc:  # a broken base must not stop the server
                log.error("skipping knowledge base %s: %s", name, exc)
        log.info("knowledge bases loaded from %s: %s", self.catalog.describe(), ", ".join(self._bases) or "none")

    # ---- bases -----------------------------------------------------------------------

    def names(self) -> list[str]:
        self._rescan()
        with self._bases_lock:
            return sorted(self._bases)

    def summaries(self) -> list[dict]:
        self._rescan()
        with self._bases_lock:
            bases = list(self._bases.values())
        for base in bases:
            base.refresh()
        return [b.summary() for b in sorted(bases, key=lambda b: b.name)]

    def get(self, name: str) -> KnowledgeBase:
        name = check_kb_name(name)
        base = self._discover(name)
        if base is None:
            raise UnknownKnowledgeBaseError(f"knowledge base {name!r} does not exist; upload files to create it")
        base.refresh()  # what another instance saved is what this one lists and searches
        return base

    # ---- other instances on the same folder ------------------------------------------

    def _discover(self, name: str) -> Optional[KnowledgeBase]:
        """The base by name, as the shared folder has it now: made or deleted by another instance too."""
        with self._bases_lock:
            base = self._bases.get(name)
            if base is not None and base.version is not None and not self.catalog.saved(name):
                log.info("knowledge base %r was deleted by another instance", name)
                base.mark_deleted()
                del self._bases[name]
                return None
            if base is None and self.catalog.saved(name):
                log.info("knowledge base %r found in %s", name, self.catalog.describe())
                base = self._bases[name] = self.catalog.open(name)
        return base

    def _rescan(self) -> None:
        on_disk = self.catalog.names()
        with self._bases_lock:
            known = set(self._bases)
        for name in on_disk ^ known:
            try:
                self._discover(check_kb_name(name))
            except Exception as exc:
                log.debug("skipping %s: %s", name, exc)

    def _get_or_create(self, name: str) -> KnowledgeBase:
        name = check_kb_name(name)
        with self._bases_lock:
            if name not in self._bases:
                self._bases[name] = self.catalog.open(name)
            return self._bases[name]

    def delete_base(self, name: str) -> None:
        """Cancel the base's jobs, wait for a save in progress, then remove it; nothing it held comes back."""
        base = self.get(name)
        for job in self.jobs.unfinished(base.name):
            self.cancel_job(job.id)
        # held throughout, so an upload to the same name cannot open the folder while it is removed
        with self._bases_lock:
            base.mark_deleted()
            if self._bases.get(base.name) is base:
                del self._bases[base.name]
            self.catalog.remove(base)

    def total_chunks(self) -> int:
        with self._bases_lock:
            return sum(b.chunk_count for b in self._bases.values())

    # ---- ingestion -------------------------------------------------------------------

    def submit(self, kb: str, uploads: Sequence[Upload]) -> tuple[Job, concurrent.futures.Future]:
        """Queue an ingestion job; IngestQueueFullError when --max-ingest-jobs are queued or running."""
        base = self._get_or_create(kb)
        with self._submit_lock:
            if len(self.jobs.unfinished()) >= self.config.max_ingest_jobs:
                raise IngestQueueFullError(
                    f"{self.config.max_ingest_jobs} upload jobs are already queued or running; retry shortly"
                )
            job = Job(kb=base.name, files=[FileResult(u.name) for u in uploads])
            self.jobs.add(job)
            future = self._ingest.submit(self._run_job, job, base, list(uploads))
            self._futures[job.id] = future
        future.add_done_callback(lambda _: self._futures.pop(job.id, None))
        return job, future

    def cancel_job(self, job_id: str) -> Optional[Job]:
        """Stop a job: a queued one never starts, a running one stops at its next checkpoint."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        job.cancel()
        future = self._futures.get(job_id)
        if future is not None and future.cancel():
            self._finish(job, "cancelled", "cancelled before it started")
        return job

    def _run_job(self, job: Job, base: KnowledgeBase, uploads: list[Upload]) -> Job:
        began = time.monotonic()
        try:
            return self._ingest_job(job, base, uploads)
        finally:
            self._count(job, time.monotonic() - began)

    def _count(self, job: Job, seconds: float) -> None:
        self.counters.add("seconds", seconds)
        self.counters.add(f"jobs_{job.state}")
        for result in job.files:
            self.counters.add(f"files_{result.status}")
            if result.status in ("added", "replaced"):
                self.counters.add("chunks", result.chunks or 0)

    def _ingest_job(self, job: Job, base: KnowledgeBase, uploads: list[Upload]) -> Job:
        deadline = time.monotonic() + self.config.ingest_timeout
        try:
            self._ingest_files(job, base, uploads, deadline)
            self._finish(job, "done")
        except _Stop as stop:
            self._finish(job, stop.state, str(stop))
        except (ParseCancelled, KnowledgeBaseDeletedError):
            self._finish(job, "cancelled", "cancelled: the job or its knowledge base was deleted")
        except KnowledgeBaseError as exc:  # the base cannot take files (another embedding model, an old format)
            self._finish(job, "failed", str(exc))
        except Exception:
            log.exception("ingestion job %s failed", job.id)
            self._finish(job, "failed", "the upload could not be saved because of an internal error; nothing was changed")
        return job

    @staticmethod
    def _finish(job: Job, state: str, error: Optional[str] = None) -> None:
        job.error = error
        for result in job.files:
            if result.status == "pending":
                result.status, result.reason = ("cancelled" if state == "cancelled" else "failed"), error
        job.state = state
        job.finished_at = time.time()

    def _checkpoint(self, job: Job, deadline: float) -> None:
        if job.cancelled:
            raise _Stop("cancelled", "cancelled on request")
        if time.monotonic() > deadline:
            raise self._timed_out()

    def _timed_out(self) -> _Stop:
        return _Stop("failed", f"the upload took longer than {self.config.ingest_timeout:g} s (--ingest-timeout)")

    def _ingest_files(self, job: Job, base: KnowledgeBase, uploads: list[Upload], deadline: float) -> None:
        base.check_writable()
        job.state = "parsing"
        last_of_name = {u.name: i for i, u in enumerate(uploads)}
        parsed: list[tuple[Upload, str, list]] = []
        for i, upload in enumerate(uploads):
            self._checkpoint(job, deadline)
            result = job.files[i]
            if last_of_name[upload.name] != i:
                result.status, result.reason = "failed", "the same file name appears again later in this upload"
                continue
            sha = hashlib.sha256(upload.data).hexdigest()
            if base.file_state(upload.name, sha) == "unchanged":
                result.status = "unchanged"
                result.chunks = len(base.manifest["files"][upload.name]["chunk_ids"])
                continue
            try:
                chunks = self._sandbox.parse(upload.name, upload.data, deadline, lambda: job.cancelled)
            except ParseTimedOut:  # the job is over its time: it fails as a whole
                result.status, result.reason = "failed", "parsing was stopped: the upload ran out of time"
                raise self._timed_out() from None
            except LoaderError as exc:  # this file only: the others are still ingested
                result.status, result.reason = "failed", str(exc)
                continue
            parsed.append((upload, sha, chunks))

        job.chunks_total = sum(len(c) for _, _, c in parsed)
        job.state = "embedding"

        def advance(n: int) -> None:
            job.chunks_done += n
            self._checkpoint(job, deadline)  # raising here stops embedding between batches

        ready = []
        for upload, sha, chunks in parsed:
            try:
                vectors = self.embedder.encode([c.text for c in chunks], progress=advance)
            except _Stop:
                raise
            except Exception:
                log.exception("embedding %r failed", upload.name)
                result = next(r for r in job.files if r.name == upload.name and r.status == "pending")
                result.status, result.reason = "failed", "the file's text could not be embedded"
                continue
            ready.append(FileChunks(upload.name, sha, len(upload.data), chunks, vectors))
        if not ready:
            return
        self._checkpoint(job, deadline)
        job.state = "saving"
        states = {item.name: base.file_state(item.name, item.sha256) for item in ready}
        base.apply(ready)
        for item in ready:
            result = next(r for r in job.files if r.name == item.name and r.status == "pending")
            result.status, result.chunks = states[item.name], len(item.chunks)

    # ---- retrieval -------------------------------------------------------------------

    async def search(self, kb: str, query: str, top_k: int) -> list[Hit]:
        base = await asyncio.to_thread(self.get, kb)
        return await asyncio.to_thread(self._search, base, query, top_k)

    def _search(self, base: KnowledgeBase, query: str, top_k: int) -> list[Hit]:
        """`base` as get() returned it: already refreshed to the newest saved version."""
        vector = self.embedder.query_vector(query)
        return base.search(query, vector, top_k)

    def is_relevant(self, hit: Hit) -> bool:
        threshold = self.config.score_threshold
        if threshold is None:
            threshold = self.embedder.relevance_threshold
        return hit.score >= threshold or hit.keyword_score >= self.config.keyword_threshold

    async def retrieve(self, kb: str, question: str, top_k: int) -> Retrieval:
        base = await asyncio.to_thread(self.get, kb)
        if base.chunk_count == 0:
            raise EmptyKnowledgeBaseError(f"knowledge base {base.name!r} has no documents yet; upload some first")
        hits = [h for h in await asyncio.to_thread(self._search, base, question, top_k) if self.is_relevant(h)]
        if not hits:
            return Retrieval([], None, self.rag_prompt.no_match(question, base.name))
        return Retrieval(hits, self.rag_prompt.render(question, hits), None)

    def shutdown(self) -> None:
        for job in self.jobs.unfinished():
            job.cancel()
        self._ingest.shutdown(wait=True, cancel_futures=True)
        self._sandbox.close()
        self.catalog.close()
