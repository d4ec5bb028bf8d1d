"""File loaders by extension: bytes in, text sections (with page numbers) out.

Each loader raises LoaderError with a sentence a user can act on; the
ingestion job reports it for that file and carries on with the others.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from pathlib import PurePath
from typing import Callable, Optional

log = logging.getLogger(__name__)


class LoaderError(Exception):
    """This file cannot be read; the message says why."""


@dataclass(frozen=True)
class ParseLimits:
    """What one uploaded file may cost to read; each is a flag (see knowledge/config.py)."""

    max_pages: int = 1000
    max_uncompressed_bytes: int = 200 * 1024 * 1024
    max_compression_ratio: float = 100.0
    max_zip_entries: int = 10_000


@dataclass(frozen=True)
class Section:
    """A piece of a document's text, with the page it came from (PDF only)."""

    text: str
    page: Optional[int] = None


# ---- plain text ---------------------------------------------------------------------


def _looks_like_utf16(data: bytes) -> Optional[str]:
    """UTF-16 without BOM: ASCII-range text has a NUL in every other byte."""
    sample = data[:4096]
    if len(sample) < 4:
        return None
    even_nuls = sample[0::2].count(0) / len(sample[0::2])
    odd_nuls = sample[1::2].count(0) / len(sample[1::2])
    if odd_nuls > 0.3 and even_nuls < 0.05:
        return "utf-16-le"
    if even_nuls > 0.3 and odd_nuls < 0.05:
        return "utf-16-be"
    return None


def _mostly_cjk(text: str) -> bool:
    letters = [c for c in text if not c.isspace() and not c.isascii()]
    if not letters:
        return True  # pure ASCII decodes the same in every candidate
    cjk = sum(1 for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef")
    return cjk / len(letters) > 0.6


def decode_text(data: bytes) -> str:
    """Detect the encoding of a text file: BOMs, UTF-8, UTF-16, GB18030/GBK, then a statistical guess."""
    for bom, encoding in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            return data.decode(encoding)
    utf16 = _looks_like_utf16(data)
    if utf16:
        try:
            return data.decode(utf16)
        except UnicodeDecodeError:
            pass
    if b"\x00" in data:
        raise LoaderError("the file looks binary, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        text = data.decode("gb18030")
        if _mostly_cjk(text):
            return text
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    if best is None:
        raise LoaderError("the text encoding could not be recognised (not UTF-8, UTF-16 or GBK)")
    return str(best)


def load_text(data: bytes, limits: ParseLimits) -> list[Section]:
    return [Section(decode_text(data).replace("\r\n", "\n").replace("\r", "\n"))]


# ---- Word ---------------------------------------------------------------------------


def check_zip_package(data: bytes, limits: ParseLimits, kind: str) -> None:
    """Refuse zip bombs before anything is inflated: entry count, total size and ratio as declared.

    Python's zipfile never inflates an entry past its declared size, so the
    declared sizes bound what parsing can take.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as package:
            entries = package.infolist()
    except (zipfile.BadZipFile, ValueError, OSError):
        raise LoaderError(f"not a valid {kind} file (it is not a zip package)") from None
    if len(entries) > limits.max_zip_entries:
        raise LoaderError(f"the {kind} package holds {len(entries)} parts; the limit is {limits.max_zip_entries}")
    inflated = sum(e.file_size for e in entries)
    if inflated > limits.max_uncompressed_bytes:
        raise LoaderError(
            f"the {kind} file unpacks to {inflated / 2**20:.0f} MiB; the limit is "
            f"{limits.max_uncompressed_bytes / 2**20:.0f} MiB (--max-uncompressed-mb)"
        )
    # small packages of plain XML compress well; only a large inflated size with a wild ratio is a bomb
    if inflated > 8 * 2**20 and inflated / max(len(data), 1) > limits.max_compression_ratio:
        raise LoaderError(
            f"the {kind} file unpacks to {inflated / max(len(data), 1):.0f} times its size; "
            f"the limit is {limits.max_compression_ratio:g} (--max-compression-ratio)"
        )


def load_docx(data: bytes, limits: ParseLimits) -> list[Section]:
    check_zip_package(data, limits, ".docx")
    import docx
    from docx.opc.exceptions import PackageNotFoundError
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile, OSError) as exc:
        # the parser's own words name internals (part paths, XML errors): they go to the log
        log.info("docx parse failure: %r", exc)
        raise LoaderError("not a valid .docx file (its package or XML is damaged)") from None
    blocks: list[str] = []
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                cells = [c.text.strip() for c in row.cells]
                # merged cells repeat their text in every grid cell they span
                deduped = [c for i, c in enumerate(cells) if c and (i == 0 or c != cells[i - 1])]
                if deduped:
                    blocks.append(" | ".join(deduped))
        else:
            blocks.append(_heading_marker(block) + block.text)
    return [Section("\n".join(blocks))]


def _heading_marker(paragraph) -> str:
    """Word headings become Markdown ones, so the splitter keeps sections together."""
    style = (paragraph.style.name if paragraph.style is not None else "") or ""
    if style.lower().startswith("heading ") and style[8:].strip().isdigit() and paragraph.text.strip():
        return "#" * min(int(style[8:]), 6) + " "
    if style.lower() == "title" and paragraph.text.strip():
        return "# "
    return ""


# ---- PDF ----------------------------------------------------------------------------


def load_pdf(data: bytes, limits: ParseLimits) -> list[Section]:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError, PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            # many PDFs are "encrypted" with an empty user password
            if not reader.decrypt(""):
                raise LoaderError("the PDF is encrypted with a password")
        pages = len(reader.pages)
        if pages > limits.max_pages:
            raise LoaderError(f"the PDF has {pages} pages; the limit is {limits.max_pages} (--max-pages-per-file)")
        sections = [Section(page.extract_text() or "", page=i + 1) for i, page in enumerate(reader.pages)]
    except LoaderError:
        raise
    except FileNotDecryptedError:
        raise LoaderError("the PDF is encrypted with a password") from None
    except (PdfReadError, ValueError, KeyError, TypeError, OSError, AttributeError, IndexError, RecursionError) as exc:
        log.info("pdf parse failure: %r", exc)
        raise LoaderError("not a readable PDF (its structure is damaged)") from None
    return sections


# ---- registry -----------------------------------------------------------------------

LOADERS: dict[str, Callable[[bytes, ParseLimits], list[Section]]] = {
    ".txt": load_text,
    ".md": load_text,
    ".markdown": load_text,
    ".docx": load_docx,
    ".pdf": load_pdf,
}


def supported_extensions() -> list[str]:
    return sorted(LOADERS)


def load_file(name: str, data: bytes, limits: ParseLimits = ParseLimits()) -> list[Section]:
    """Read one uploaded file; raises LoaderError naming what is wrong."""
    ext = PurePath(name).suffix.lower()
    loader = LOADERS.get(ext)
    if loader is None:
        raise LoaderError(
            f"unsupported file type {ext or '(no extension)'!r}; supported: {', '.join(supported_extensions())}"
        )
    if not data:
        raise LoaderError("the file is empty")
    sections = loader(data, limits)
    if not any(s.text.strip() for s in sections):
        what = "no text layer (a scanned PDF?)" if ext == ".pdf" else "no text"
        raise LoaderError(f"the file has {what}")
    return sections
