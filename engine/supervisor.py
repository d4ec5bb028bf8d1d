"""Running the inference engine (vLLM) as a child process: start it, watch it, restart it, stop it.

The child listens on an internal loopback port and is reached through the
remote-engine client like any other OpenAI-compatible server. Its output goes
to our log line by line, so a model load's progress is visible where the
service's own is. It runs in its own process group, which is stopped as a
whole (vLLM's workers included), and it is told to stop if this process dies.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import subprocess
import threading
import time
from typing import Optional, Sequence

log = logging.getLogger("chatllm.engine")

PR_SET_PDEATHSIG = 1
MAX_BACKOFF_S = 30.0
TAIL_LINES = 40


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class EngineProcess:
    def __init__(self, argv: Sequence[str], restart: bool = True, env: Optional[dict[str, str]] = None) -> None:
        self.argv = list(argv)
        self._env = {**os.environ, **env} if env else None  # secrets go here, not on the command line
        self.restart = restart
        self._proc: Optional[subprocess.Popen] = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.restarts = 0
        self.started_at = 0.0
        self._watcher: Optional[threading.Thread] = None

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        log.info("starting the inference engine: %s", " ".join(self.argv))
        with self._lock:
            self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)
        self._watcher.start()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after `timeout`."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        log.info("stopping the inference engine (pid %d)", proc.pid)
        self._signal(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("the inference engine did not stop in %.0f s; killing it", timeout)
            self._signal(proc, signal.SIGKILL)
            proc.wait(5)

    def exit_reason(self) -> Optional[str]:
        """Why the engine process is not running, or None while it runs."""
        with self._lock:
            proc = self._proc
        if proc is None:
            return "the inference engine process was never started"
        code = proc.poll()
        if code is None:
            return None
        tail = "\n".join(list(self._tail)[-12:])
        return (f"the inference engine process exited with status {code} ({' '.join(self.argv[:3])} ...); "
                f"its last output:\n{tail}" if tail else f"the inference engine process exited with status {code}")

    def health(self) -> dict:
        with self._lock:
            proc = self._proc
        return {"pid": proc.pid if proc else None, "running": proc is not None and proc.poll() is None,
                "restarts": self.restarts, "command": self.argv,
                "uptime_s": round(time.monotonic() - self.started_at, 1) if proc else None}

    # ---- internals ------------------------------------------------------------------------

    def _spawn(self) -> None:
        self._tail.clear()
        self._proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent, text=True, errors="replace", bufsize=1,
            env=self._env,
        )
        self.started_at = time.monotonic()
        threading.Thread(target=self._pump, args=(self._proc,), name="engine-output", daemon=True).start()

    def _pump(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                self._tail.append(line)
                log.info("[engine] %s", line[:2000])

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            code = proc.wait() if proc is not None else None
            if self._stopping.is_set() or not self.restart:
                return
            ran = time.monotonic() - self.started_at
            log.error("the inference engine (pid %d) exited with status %s after %.0f s; restarting in %.0f s",
                      proc.pid, code, ran, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = 1.0 if ran > 300 else min(backoff * 2, MAX_BACKOFF_S)  # a crash loop backs off
            with self._lock:
                if self._stopping.is_set():
                    return
                self.restarts += 1
                self._spawn()

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
