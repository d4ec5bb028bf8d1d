"""The knowledge bases of one server: ingestion jobs, retrieval, and the RAG prompt."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from knowledge.config import KnowledgeConfig
from knowledge.embeddings import SentenceEmbedder
from knowledge.jobs import FileResult, Job, JobRegistry
from knowledge.loaders import LoaderError, load_file
from knowledge.names import check_kb_name
from knowledge.rag_prompt import RagPrompt
from knowledge.splitting import DocumentSplitter, SplitterSettings
from knowledge.store import (
    EmptyKnowledgeBaseError,
    FileChunks,
    Hit,
    KnowledgeBase,
    UnknownKnowledgeBaseError,
)

log = logging.getLogger(__name__)


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
    def __init__(self, config: KnowledgeConfig, embedder: SentenceEmbedder) -> None:
        self.config = config
        self.embedder = embedder
        self.settings = SplitterSettings(config.chunk_size, config.chunk_overlap)
        self.splitter = DocumentSplitter(self.settings)
        self.rag_prompt = RagPrompt(config.rag_prompt_file)
        self.root = Path(config.knowledge_dir).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.jobs = JobRegistry()
        self._bases: dict[str, KnowledgeBase] = {}
        self._bases_lock = threading.Lock()
        # one ingestion at a time: embedding is CPU-bound and shares the machine with the model
        self._ingest = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                name = check_kb_name(folder.name)
                self._bases[name] = KnowledgeBase(name, folder, embedder, self.settings)
            except Exception as exc:  # a broken folder must not stop the server
                log.error("skipping knowledge base folder %s: %s", folder, exc)
        log.info("knowledge bases loaded from %s: %s", self.root, ", ".join(self._bases) or "none")

    # ---- bases -----------------------------------------------------------------------

    def names(self) -> list[str]:
        with self._bases_lock:
            return sorted(self._bases)

    def summaries(self) -> list[dict]:
        with self._bases_lock:
            bases = list(self._bases.values())
        return [b.summary() for b in sorted(bases, key=lambda b: b.name)]

    def get(self, name: str) -> KnowledgeBase:
        name = check_kb_name(name)
        with self._bases_lock:
            base = self._bases.get(name)
        if base is None:
            raise UnknownKnowledgeBaseError(f"knowledge base {name!r} does not exist; upload files to create it")
        return base

    def _get_or_create(self, name: str) -> KnowledgeBase:
        name = check_kb_name(name)
        with self._bases_lock:
            if name not in self._bases:
                self._bases[name] = KnowledgeBase(name, self.root / name, self.embedder, self.settings)
            return self._bases[name]

    def delete_base(self, name: str) -> None:
        base = self.get(name)
        with self._bases_lock:
            self._bases.pop(base.name, None)
        shutil.rmtree(base.folder, ignore_errors=True)

    def total_chunks(self) -> int:
        with self._bases_lock:
            return sum(b.chunk_count for b in self._bases.values())

    # ---- ingestion -------------------------------------------------------------------

    def submit(self, kb: str, uploads: Sequence[Upload], rejected: Sequence[FileResult] = ()) -> tuple[Job, concurrent.futures.Future]:
        """Queue an ingestion job; files already refused (bad name, too big) are reported in it."""
        base = self._get_or_create(kb)
        job = Job(kb=base.name, files=[FileResult(u.name) for u in uploads] + list(rejected))
        self.jobs.add(job)
        future = self._ingest.submit(self._run_job, job, base, list(uploads))
        return job, future

    def _run_job(self, job: Job, base: KnowledgeBase, uploads: list[Upload]) -> Job:
        try:
            self._ingest_files(job, base, uploads)
            job.state = "done"
        except Exception as exc:
            log.exception("ingestion job %s failed", job.id)
            job.state = "failed"
            job.error = str(exc)
            for result in job.files:
                if result.status == "pending":
                    result.status, result.reason = "failed", str(exc)
        job.finished_at = time.time()
        return job

    def _ingest_files(self, job: Job, base: KnowledgeBase, uploads: list[Upload]) -> None:
        job.state = "parsing"
        last_of_name = {u.name: i for i, u in enumerate(uploads)}
        parsed: list[tuple[Upload, str, list]] = []
        for i, upload in enumerate(uploads):
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
                chunks = self.splitter.split(upload.name, load_file(upload.name, upload.data))
            except LoaderError as exc:
                result.status, result.reason = "failed", str(exc)
                continue
            if not chunks:
                result.status, result.reason = "failed", "the file has no text"
                continue
            parsed.append((upload, sha, chunks))

        job.chunks_total = sum(len(c) for _, _, c in parsed)
        job.state = "embedding"

        def advance(n: int) -> None:
            job.chunks_done += n

        ready = []
        for upload, sha, chunks in parsed:
            vectors = self.embedder.encode([c.text for c in chunks], progress=advance)
            ready.append(FileChunks(upload.name, sha, len(upload.data), chunks, vectors))
        if not ready:
            return
        job.state = "saving"
        states = {item.name: base.file_state(item.name, item.sha256) for item in ready}
        base.apply(ready)
        for item in ready:
            result = next(r for r in job.files if r.name == item.name and r.status == "pending")
            result.status, result.chunks = states[item.name], len(item.chunks)

    # ---- retrieval -------------------------------------------------------------------

    async def search(self, kb: str, query: str, top_k: int) -> list[Hit]:
        base = self.get(kb)
        return await asyncio.to_thread(self._search, base, query, top_k)

    def _search(self, base: KnowledgeBase, query: str, top_k: int) -> list[Hit]:
        vector = self.embedder.encode([self.embedder.query_instruction + query])[0]
        return base.search(query, vector, top_k)

    def is_relevant(self, hit: Hit) -> bool:
        return hit.score >= self.config.score_threshold or hit.keyword_score >= self.config.keyword_threshold

    async def retrieve(self, kb: str, question: str, top_k: int) -> Retrieval:
        base = self.get(kb)
        if base.chunk_count == 0:
            raise EmptyKnowledgeBaseError(f"knowledge base {base.name!r} has no documents yet; upload some first")
        hits = [h for h in await self.search(kb, question, top_k) if self.is_relevant(h)]
        if not hits:
            return Retrieval([], None, self.rag_prompt.no_match(question, base.name))
        return Retrieval(hits, self.rag_prompt.render(question, hits), None)

    def shutdown(self) -> None:
        self._ingest.shutdown(wait=True, cancel_futures=True)
