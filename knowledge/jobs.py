"""Ingestion jobs: what a user waits on while files are parsed and vectorised."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

JOB_STATES = ("queued", "parsing", "embedding", "saving", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")


@dataclass
class FileResult:
    name: str
    status: str = "pending"  # added / unchanged / replaced / failed
    chunks: int = 0
    reason: Optional[str] = None

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "chunks": self.chunks, "reason": self.reason}


@dataclass
class Job:
    kb: str
    files: list[FileResult]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    state: str = "queued"
    chunks_done: int = 0
    chunks_total: int = 0
    error: Optional[str] = None
    created_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def cancel(self) -> None:
        """Ask the job to stop at its next checkpoint (between files and embedding batches)."""
        self.cancel_requested.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_requested.is_set()

    def as_dict(self) -> dict:
        return {
            "id": self.id,
            "kb": self.kb,
            "state": self.state,
            "chunks_done": self.chunks_done,
            "chunks_total": self.chunks_total,
            "progress": round(self.chunks_done / self.chunks_total, 4) if self.chunks_total else (1.0 if self.finished else 0.0),
            "files": [f.as_dict() for f in self.files],
            "error": self.error,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


class JobRegistry:
    """Recent jobs by id; the oldest finished ones are forgotten past `keep`."""

    def __init__(self, keep: int = 500) -> None:
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep

    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
            finished = [j.id for j in itertools.islice(self._jobs.values(), max(0, len(self._jobs) - self._keep)) if j.finished]
            for job_id in finished:
                del self._jobs[job_id]

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def unfinished(self, kb: Optional[str] = None) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.finished and (kb is None or j.kb == kb)]
