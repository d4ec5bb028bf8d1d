"""Crash-safe saving of one knowledge base folder.

Each save writes a complete new version folder, then atomically points the
`CURRENT` file at it; a crash at any moment leaves the previous version
intact and in use. Older versions are removed only after the switch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("v*") if p.is_dir() and p.name[1:].isdigit()), key=lambda p: int(p.name[1:]))


def current_version(folder: Path) -> Optional[Path]:
    """The version folder in use, or None for a base never saved."""
    pointer = folder / CURRENT
    if pointer.is_file():
        target = folder / pointer.read_text().strip()
        if (target / MANIFEST).is_file():
            return target
        log.warning("%s points at a missing version; using the newest complete one", pointer)
    complete = [v for v in _versions(folder) if (v / MANIFEST).is_file()]
    return complete[-1] if complete else None


def save_version(folder: Path, write: Callable[[Path], None]) -> Path:
    """Have `write(tmpdir)` fill a new version, then switch to it atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    versions = _versions(folder)
    number = int(versions[-1].name[1:]) + 1 if versions else 1
    staging = folder / f".staging-v{number}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    write(staging)
    for item in staging.iterdir():
        with open(item, "rb") as fh:
            os.fsync(fh.fileno())
    final = folder / f"v{number}"
    os.replace(staging, final)
    pointer_tmp = folder / f".{CURRENT}.tmp"
    pointer_tmp.write_text(final.name)
    with open(pointer_tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(pointer_tmp, folder / CURRENT)
    _fsync_dir(folder)
    for old in versions:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in folder.glob(".staging-v*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
