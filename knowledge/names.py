"""Untrusted names: uploaded file names and knowledge-base names never become paths as given."""

from __future__ import annotations

import re
import unicodedata

_KB_NAME = re.compile(r"\w[\w\-.]{0,63}")  # \w: letters of any script (知识库), digits, _
_RESERVED = {"jobs"}  # /api/knowledge/jobs/... is the job route
MAX_FILE_NAME = 200
# control characters, format characters (bidi overrides, zero-width joiners),
# line/paragraph separators, unassigned and surrogate code points
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Cn", "Zl", "Zp"})


class NameError_(ValueError):
    """A name that cannot be used; the message says why."""


def safe_file_name(raw: str) -> str:
    """The display/key name of an upload: its last path component, with nothing invisible or misleading.

    Names are only ever shown and used as keys, never as paths; still, path
    parts, control characters and bidi overrides (which make `exe.txt` read as
    `txt.exe`) are removed so what a user sees is what was stored.
    """
    name = unicodedata.normalize("NFC", raw or "")
    name = name.replace("\\", "/").split("/")[-1]
    name = "".join(" " if ch.isspace() else ch for ch in name if unicodedata.category(ch) not in _INVISIBLE)
    name = " ".join(name.split()).strip(".").strip()
    if not name:
        raise NameError_(f"file name {raw[:100]!r} has nothing usable in it")
    if len(name) > MAX_FILE_NAME:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: MAX_FILE_NAME - len(ext) - 1] + dot + ext) if dot and len(ext) < 16 else name[:MAX_FILE_NAME]
    return name


def check_kb_name(name: str) -> str:
    """Knowledge-base names become folder names: 1-64 letters, digits, '_', '-' or '.', the whole name."""
    name = unicodedata.normalize("NFC", name or "")
    if name.lower() in _RESERVED:
        raise NameError_(f"knowledge base name {name!r} is reserved")
    if not _KB_NAME.fullmatch(name) or ".." in name:
        raise NameError_(
            f"knowledge base name {name[:100]!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name
