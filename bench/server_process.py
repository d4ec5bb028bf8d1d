"""Starting the real server in a subprocess for benchmark scripts."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: Sequence[str] = (), timeout: float = 300) -> Iterator[str]:
    """Yield the base URL of a freshly started `webui/webui_server.py`; stop it afterwards."""
    with server_process(args, timeout) as (url, _):
        yield url


@contextlib.contextmanager
def server_process(args: Sequence[str] = (), timeout: float = 300) -> Iterator[tuple[str, subprocess.Popen]]:
    """Like running_server, also yielding the process (for watching its memory and files)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "webui" / "webui_server.py"), "--port", str(port), "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode} while starting")
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start in time")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)
