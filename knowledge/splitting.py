"""Splitting document text into chunks that respect Markdown headings and Chinese punctuation.

Markdown is first cut at its headings; each section's chunks then carry the
heading path as a first line, so a chunk deep in "Installation" still says it
is about installation when it is embedded and when it is shown as a source.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from knowledge.loaders import Section

# paragraph, line, then sentence ends (Chinese full-width first), clauses, words
SEPARATORS = ["\n\n", "\n", "。", "！", "？", "；", "! ", "? ", "; ", ". ", "，", ", ", " ", ""]

DEFAULT_CHUNK_SIZE = 800
DEFAULT_CHUNK_OVERLAP = 120


@dataclass(frozen=True)
class SplitterSettings:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP

    def __post_init__(self) -> None:
        if self.chunk_size < 50:
            raise ValueError(f"--chunk-size must be at least 50 characters (got {self.chunk_size})")
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise ValueError(
                f"--chunk-overlap must be at least 0 and less than --chunk-size "
                f"(got {self.chunk_overlap} with chunk size {self.chunk_size})"
            )

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Chunk:
    text: str
    page: Optional[int] = None
    heading: str = ""


def markdown_heading(line: str) -> Optional[tuple[int, str]]:
    """(level, title) of an ATX heading line such as `## Install ##`, else None.

    Plain string operations, linear in the line: a pattern with nested
    quantifiers here once let a file of spaces stall the server.
    """
    level = len(line) - len(line.lstrip("#"))
    rest = line[level:]
    if not 1 <= level <= 6 or not rest[:1].isspace():
        return None
    title = rest.strip()
    closing = title.rstrip("#")
    if closing != title and (not closing or closing[-1].isspace()):
        title = closing.rstrip()  # an optional closing run of #s after a space
    return (level, title) if title else None


def _is_fence(line: str) -> bool:
    return line.lstrip().startswith(("```", "~~~"))


def markdown_sections(text: str) -> list[tuple[str, str]]:
    """(heading path, body) pairs; headings inside code fences are not headings."""
    sections: list[tuple[str, str]] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []
    in_fence = False

    def close() -> None:
        content = "\n".join(body).strip()
        if content:
            sections.append((" > ".join(title for _, title in path), content))
        body.clear()

    for line in text.split("\n"):
        if _is_fence(line):
            in_fence = not in_fence
        heading = None if in_fence else markdown_heading(line)
        if heading:
            close()
            level, title = heading
            path = [(lvl, t) for lvl, t in path if lvl < level] + [(level, title)]
        else:
            body.append(line)
    close()
    return sections


class DocumentSplitter:
    def __init__(self, settings: SplitterSettings) -> None:
        from langchain_text_splitters import RecursiveCharacterTextSplitter

        self.settings = settings
        self._splitter = RecursiveCharacterTextSplitter(
            separators=SEPARATORS,
            chunk_size=settings.chunk_size,
            chunk_overlap=settings.chunk_overlap,
            keep_separator="end",
            strip_whitespace=True,
        )

    def split(self, file_name: str, sections: Sequence[Section]) -> list[Chunk]:
        # .docx headings arrive as Markdown headings (see loaders.load_docx)
        is_markdown = file_name.lower().endswith((".md", ".markdown", ".docx"))
        chunks: list[Chunk] = []
        for section in sections:
            parts = markdown_sections(section.text) if is_markdown else [("", section.text)]
            for heading, body in parts:
                for piece in self._splitter.split_text(body):
                    text = f"{heading}\n{piece}" if heading else piece
                    chunks.append(Chunk(text=text, page=section.page, heading=heading))
        return chunks
