"""No regular expression or parser of ours takes super-linear time on hostile text.

A Markdown heading pattern with nested quantifiers once froze the whole server
for seconds on a 1.6 KB file of spaces (and 8x longer for each doubling). Every
pattern in the service's modules, and every function that parses user text,
gets 64 KB of the inputs that break such patterns.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import time

import pytest

from knowledge.lexical import tokenize
from knowledge.loaders import decode_text
from knowledge.names import NameError_, check_kb_name, safe_file_name
from knowledge.rag_prompt import language_of
from knowledge.splitting import DocumentSplitter, SplitterSettings, markdown_heading, markdown_sections
from knowledge.loaders import Section

SIZE = 64 * 1024
BUDGET = 1.0  # seconds for 64 KB; a quadratic pattern needs minutes, a cubic one years

ADVERSARIAL = {
    "spaces": " " * SIZE,
    "tabs and spaces": " \t" * (SIZE // 2),
    "hashes": "#" * SIZE,
    "heading then spaces then a letter": "# x" + " " * SIZE + "y",
    "heading with trailing hashes": "# " + "# " * (SIZE // 2) + "x",
    "word joiners": "a-" * (SIZE // 2),
    "dots after a letter": "a" + "." * SIZE,
    "letters": "a" * SIZE,
    "digits and dots": "1." * (SIZE // 2),
    "plus signs": "a+" * (SIZE // 2) + "!",
    "underscores": "a" + "_" * SIZE + "!",
    "fence markers": "`" * SIZE,
    "control characters": "\x01\u202e" * (SIZE // 2),
    "cjk": "知识库" * (SIZE // 3),
    "newlines": "\n" * SIZE,
    "name-like": "a" + "-." * (SIZE // 2) + "/",
}

OUR_PACKAGES = ("api", "chat", "engine", "knowledge", "webui")


def _our_patterns() -> list[tuple[str, re.Pattern]]:
    found = []
    for package in OUR_PACKAGES:
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            if info.name.endswith("parse_worker"):
                continue
            mod = importlib.import_module(info.name)
            for name, value in vars(mod).items():
                if isinstance(value, re.Pattern):
                    found.append((f"{info.name}.{name}", value))
    return found


PATTERNS = _our_patterns()


def test_the_patterns_are_found():
    names = {n for n, _ in PATTERNS}
    assert "knowledge.lexical._WORD" in names and "knowledge.names._KB_NAME" in names
    assert not any(n.startswith("knowledge.splitting.") for n in names)  # headings are parsed without regex


def _timed(fn, *args) -> float:
    started = time.perf_counter()
    try:
        fn(*args)
    except (NameError_, ValueError):
        pass
    return time.perf_counter() - started


@pytest.mark.parametrize("name,pattern", PATTERNS, ids=[n for n, _ in PATTERNS])
def test_every_pattern_is_linear_on_hostile_text(name, pattern):
    for kind, text in ADVERSARIAL.items():
        for use in (pattern.match, pattern.fullmatch, pattern.search, pattern.findall, pattern.split):
            elapsed = _timed(use, text)
            assert elapsed < BUDGET, f"{name}.{use.__name__} took {elapsed:.2f} s on {kind}"


PARSERS = {
    "markdown_sections": markdown_sections,
    "markdown_heading": markdown_heading,
    "tokenize": tokenize,
    "check_kb_name": check_kb_name,
    "safe_file_name": safe_file_name,
    "language_of": language_of,
    "decode_text": lambda text: decode_text(text.encode("utf-8")),
    "split .md": lambda text: DocumentSplitter(SplitterSettings()).split("a.md", [Section(text)]),
}


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_text_parser_is_linear_on_hostile_text(name):
    for kind, text in ADVERSARIAL.items():
        elapsed = _timed(PARSERS[name], text)
        assert elapsed < BUDGET * 3, f"{name} took {elapsed:.2f} s on {kind}"


def test_heading_parser_keeps_its_meaning():
    assert markdown_heading("## Install ##") == (2, "Install")
    assert markdown_heading("# C#") == (1, "C#")
    assert markdown_heading("####### seven") is None and markdown_heading("#nospace") is None
    assert markdown_heading("#   ") is None and markdown_heading("### ###") is None
    assert markdown_sections("# A\ntext\n```\n# not a heading\n```\n## B\nmore") == [
        ("A", "text\n```\n# not a heading\n```"), ("A > B", "more")]
