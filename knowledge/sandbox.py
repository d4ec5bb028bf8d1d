"""Parsing uploads in a separate process with memory and time limits.

The server's side of `knowledge.parse_worker`: one long-lived child process,
restarted whenever it crashes, runs out of memory, overruns the job's time or
is stopped by a cancel. Only the file that caused it fails; the server and the
other files of the upload carry on.
"""

from __future__ import annotations

import json
import logging
import os
import select
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from knowledge.loaders import LoaderError, ParseLimits
from knowledge.splitting import Chunk, SplitterSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
# a reply is chunks of text as JSON: a cap far above any real file, far below harm
MAX_REPLY_BYTES = 512 * 2**20


class ParseCancelled(Exception):
    """The job was cancelled while one of its files was being parsed."""


class ParseTimedOut(Exception):
    """The job's time ran out while one of its files was being parsed."""


class ParserSandbox:
    def __init__(self, limits: ParseLimits, splitter: SplitterSettings, max_chunks: int, memory_mb: int) -> None:
        self._settings = json.dumps({
            "limits": asdict(limits),
            "splitter": splitter.as_dict(),
            "max_chunks": max_chunks,
            "memory_bytes": memory_mb * 2**20 if memory_mb > 0 else 0,
        })
        self._process: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()  # one file at a time through the one process

    def parse(self, name: str, data: bytes, deadline: float, cancelled: Callable[[], bool]) -> list[Chunk]:
        """Chunks of one file; LoaderError with the reason when it cannot be parsed within the limits."""
        with self._lock:
            process = self._ensure_started()
            try:
                encoded = name.encode("utf-8")
                process.stdin.write(struct.pack(">I", len(encoded)) + encoded + struct.pack(">Q", len(data)))
                process.stdin.write(data)
                process.stdin.flush()
                size = struct.unpack(">Q", self._read(process, 8, deadline, cancelled))[0]
                if size > MAX_REPLY_BYTES:
                    raise LoaderError("the parser's reply was too large")
                reply = json.loads(self._read(process, size, deadline, cancelled))
            except (BrokenPipeError, EOFError, OSError, ValueError, struct.error):
                log.warning("the parser process stopped on %r (exit %s); starting a new one", name, process.poll())
                self._stop()
                raise LoaderError("the file could not be parsed: the parser stopped on it "
                                  "(out of memory or a crash); the other files are not affected") from None
            except (LoaderError, ParseCancelled, ParseTimedOut):
                self._stop()
                raise
            if process.poll() is not None:
                self._stop()  # it exits after running out of memory
        if not reply.get("ok"):
            raise LoaderError(str(reply.get("reason") or "the file could not be parsed"))
        return [Chunk(text=str(t), page=p if isinstance(p, int) else None, heading=str(h)) for t, p, h in reply["chunks"]]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _ensure_started(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                       TOKENIZERS_PARALLELISM="false")
            self._process = subprocess.Popen(
                [sys.executable, "-m", "knowledge.parse_worker", self._settings],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(ROOT), env=env,
            )
        return self._process

    def _read(self, process: subprocess.Popen, size: int, deadline: float, cancelled: Callable[[], bool]) -> bytes:
        """Exactly `size` bytes of the reply, giving up at the deadline or on a cancel."""
        fd = process.stdout.fileno()
        data = bytearray()
        while len(data) < size:
            if cancelled():
                raise ParseCancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ParseTimedOut()
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if ready:
                piece = os.read(fd, min(size - len(data), 1 << 20))
                if not piece:
                    raise EOFError()
                data += piece
        return bytes(data)

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
