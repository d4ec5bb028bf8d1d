"""A lock on a knowledge-base folder that holds across processes (instances sharing one knowledge folder).

`flock` on a file inside the folder: released by the kernel if the holder dies,
so a crashed instance never leaves a base locked. Works on local disks and on
NFSv4 (where flock is emulated with byte-range locks).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
