"""Untrusted names: uploaded file names and knowledge-base names never become paths as given."""

from __future__ import annotations

import re
import unicodedata

_KB_NAME = re.compile(r"^[\w][\w\-.]{0,63}$")
_RESERVED = {"jobs"}  # /api/knowledge/jobs/... is the job route
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class NameError_(ValueError):
    """A name that cannot be used; the message says why."""


def safe_file_name(raw: str) -> str:
    """The display/key name of an upload: its last path component, cleaned."""
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").split("/")[-1]
    name = _CONTROL.sub("", name).strip().strip(".").strip()
    if not name:
        raise NameError_(f"file name {raw!r} has nothing usable in it")
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 200 - len(ext) - 1] + dot + ext) if dot else name[:200]
    return name


def check_kb_name(name: str) -> str:
    """Knowledge-base names become folder names, so only letters, digits, _ - . are allowed."""
    name = unicodedata.normalize("NFC", name or "")
    if name.lower() in _RESERVED:
        raise NameError_(f"knowledge base name {name!r} is reserved")
    if not _KB_NAME.match(name) or ".." in name:
        raise NameError_(
            f"knowledge base name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name
