"""Crash-safe saving of one knowledge base folder, in formats that cannot run code.

Each save writes a complete new version folder (the FAISS index through
`faiss.write_index`, chunk texts and metadata as JSON, the manifest), fsyncs
it, then atomically points the `CURRENT` file at it; a crash at any moment
leaves the previous version intact and in use. Older versions are removed only
after the switch. Nothing here unpickles: a knowledge folder may have been
written by someone else, and a pickle can run any code when loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
MANIFEST = "manifest.json"
INDEX = "index.faiss"
CHUNKS = "chunks.json"
LEGACY_PICKLE = "index.pkl"  # written by versions before manifest format 2
_VERSION_NAME = re.compile(r"v[0-9]{1,12}")
# a flat index file is a small header plus 4 bytes per vector component
_INDEX_HEADER_SLACK = 4096


class StoreFormatError(Exception):
    """A version folder that cannot be loaded; the message says why and what to do."""


@dataclass
class StoredVersion:
    manifest: dict
    index: Any  # faiss.IndexFlatIP
    chunks: list[dict]  # {"id", "text", "metadata"} in index order


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("v*") if _VERSION_NAME.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[1:]))


def _pointed_version(folder: Path) -> Optional[Path]:
    """The version CURRENT names, if it is a plain version folder directly inside `folder`."""
    pointer = folder / CURRENT
    if not pointer.is_file() or pointer.is_symlink() or pointer.stat().st_size > 64:
        return None
    name = pointer.read_text(encoding="ascii", errors="replace").strip()
    if not _VERSION_NAME.fullmatch(name):
        log.warning("%s holds %r, which is not a version name; ignoring it", pointer, name[:64])
        return None
    target = folder / name
    if target.is_symlink() or not (target / MANIFEST).is_file():
        log.warning("%s points at a missing or unusable version; using the newest complete one", pointer)
        return None
    return target


def current_version(folder: Path) -> Optional[Path]:
    """The version folder in use, or None for a base never saved."""
    pointed = _pointed_version(folder)
    if pointed is not None:
        return pointed
    complete = [v for v in _versions(folder) if (v / MANIFEST).is_file()]
    return complete[-1] if complete else None


def save_version(folder: Path, write: Callable[[Path], None]) -> Path:
    """Have `write(tmpdir)` fill a new version, make it durable, then switch to it atomically."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    if created:
        _fsync_path(folder.parent)
    versions = _versions(folder)
    number = int(versions[-1].name[1:]) + 1 if versions else 1
    staging = folder / f".staging-v{number}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        for item in staging.iterdir():
            _fsync_path(item)
        _fsync_path(staging)
        final = folder / f"v{number}"
        os.replace(staging, final)
        _fsync_path(folder)
        pointer_tmp = folder / f".{CURRENT}.tmp"
        pointer_tmp.write_text(final.name, encoding="ascii")
        _fsync_path(pointer_tmp)
        os.replace(pointer_tmp, folder / CURRENT)
        _fsync_path(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # the version just replaced stays until the next save: another instance may be reading it right now
    for old in versions[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in folder.glob(".staging-v*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_version_files(folder: Path, manifest: dict, index: Any, chunks: list[dict]) -> None:
    import faiss

    faiss.write_index(index, str(folder / INDEX))
    write_json(folder / CHUNKS, chunks)
    write_json(folder / MANIFEST, manifest)


def read_manifest(version: Path, base_name: str) -> dict:
    if (version / LEGACY_PICKLE).exists() and not (version / CHUNKS).exists():
        raise StoreFormatError(
            f"knowledge base {base_name!r} was saved by an older version in a pickle-based format, which is no "
            f"longer loaded because a pickle can run code; delete it (DELETE /api/knowledge/{base_name} or remove "
            f"the folder {version.parent}) and upload its files again"
        )
    try:
        manifest = read_json(version / MANIFEST)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) \
                or not isinstance(manifest.get("embedding"), dict):
            raise ValueError("not a knowledge-base manifest")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"knowledge base {base_name!r}: {version / MANIFEST} is unreadable ({exc})") from None
    return manifest


def read_chunks(version: Path, base_name: str) -> list[dict]:
    try:
        chunks = read_json(version / CHUNKS)
        if not isinstance(chunks, list) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), str) and isinstance(c.get("text"), str)
            and isinstance(c.get("metadata"), dict) for c in chunks
        ):
            raise ValueError("not a list of chunks")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise StoreFormatError(f"knowledge base {base_name!r}: {version / CHUNKS} is unreadable ({exc})") from None
    return chunks


def read_version(version: Path, base_name: str) -> StoredVersion:
    """Load and cross-check a version: manifest, chunks and a flat inner-product index that agree."""
    import faiss

    manifest = read_manifest(version, base_name)
    chunks = read_chunks(version, base_name)
    dimension = manifest["embedding"].get("dimension")
    if not isinstance(dimension, int) or not 0 < dimension <= 65536:
        raise StoreFormatError(f"knowledge base {base_name!r}: the manifest names no usable embedding dimension")
    listed = sum(len(f.get("chunk_ids", ())) for f in manifest["files"].values())
    path = version / INDEX
    expected = 4 * dimension * len(chunks)
    # checked before FAISS parses the file, so a doctored file cannot ask it for huge allocations
    if listed != len(chunks) or not path.is_file() or not expected <= path.stat().st_size <= expected + _INDEX_HEADER_SLACK:
        raise StoreFormatError(f"knowledge base {base_name!r}: version {version.name} is inconsistent "
                               f"({listed} chunks in the manifest, {len(chunks)} stored); delete and re-upload it")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise StoreFormatError(f"knowledge base {base_name!r}: {path} is not a FAISS index ({exc})") from None
    if not isinstance(index, faiss.IndexFlatIP) or index.d != dimension or index.ntotal != len(chunks):
        raise StoreFormatError(f"knowledge base {base_name!r}: {path} does not match its manifest")
    return StoredVersion(manifest, index, chunks)
