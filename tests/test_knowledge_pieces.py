"""Loaders, splitting, names and crash-safe saving, on real files."""

import io

import docx
import pytest
from pypdf import PdfReader, PdfWriter

from knowledge.loaders import LoaderError, decode_text, load_file
from knowledge.names import NameError_, check_kb_name, safe_file_name
from knowledge.persistence import current_version, save_version
from knowledge.splitting import DocumentSplitter, SplitterSettings, markdown_sections
from tests.conftest import RAG_DEV

ZH = "深度学习框架支持分布式训练。模型压缩包括量化和剪枝！你知道吗？"


@pytest.mark.parametrize(
    "encoding,prefix",
    [("utf-8", b""), ("utf-8", b"\xef\xbb\xbf"), ("gb18030", b""), ("gbk", b""), ("utf-16-le", b"\xff\xfe"),
     ("utf-16-be", b"\xfe\xff"), ("utf-16-le", b"")],
)
def test_text_encodings_are_detected(encoding, prefix):
    text = f"EasyCV 说明\n{ZH}\nline three"
    assert decode_text(prefix + text.encode(encoding)) == text


def test_gbk_is_not_mistaken_for_a_western_encoding():
    data = "中文知识库的文件可以是GBK编码".encode("gbk")
    assert decode_text(data) == "中文知识库的文件可以是GBK编码"


def _docx_bytes() -> bytes:
    document = docx.Document()
    document.add_heading("Install EasyCV", level=1)
    document.add_paragraph("First paragraph before the table.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text, table.cell(0, 1).text = "package", "version"
    table.cell(1, 0).text, table.cell(1, 1).text = "pai-easycv", "0.11"
    document.add_paragraph("Paragraph after the table.")
    buf = io.BytesIO()
    document.save(buf)
    return buf.getvalue()


def test_docx_paragraphs_and_tables_in_order():
    text = load_file("guide.docx", _docx_bytes())[0].text
    assert text.index("# Install EasyCV") < text.index("First paragraph") < text.index("pai-easycv | 0.11") < text.index("after the table")


def test_pdf_pages_are_numbered():
    sections = load_file("advanced.pdf", (RAG_DEV / "docs" / "deepspeed_advanced_install.pdf").read_bytes())
    assert [s.page for s in sections] == list(range(1, len(sections) + 1)) and len(sections) > 2
    assert any("DS_BUILD_OPS=1" in s.text for s in sections)


def _encrypted_pdf() -> bytes:
    writer = PdfWriter()
    for page in PdfReader(RAG_DEV / "docs" / "deepspeed_advanced_install.pdf").pages[:1]:
        writer.add_page(page)
    writer.encrypt(user_password="secret", owner_password="owner")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name,data,words",
    [
        ("notes.xlsx", b"PK\x03\x04", "unsupported file type '.xlsx'"),
        ("noext", b"hello", "unsupported file type"),
        ("empty.md", b"", "the file is empty"),
        ("blank.txt", b"   \n\n ", "has no text"),
        ("fake.docx", b"this is not a zip", "not a zip package"),
        ("broken.pdf", b"%PDF-1.4\nthis is not really a pdf", "not a readable PDF"),
        ("locked.pdf", None, "encrypted with a password"),
        ("binary.txt", bytes(range(256)) * 4, "binary"),
    ],
)
def test_bad_files_say_what_is_wrong(name, data, words):
    with pytest.raises(LoaderError, match=words):
        load_file(name, _encrypted_pdf() if data is None else data)


def test_markdown_sections_follow_headings_but_not_inside_code():
    md = "# A\nintro\n## B\nbody b\n```\n# not a heading\n```\n# C\nbody c"
    assert markdown_sections(md) == [("A", "intro"), ("A > B", "body b\n```\n# not a heading\n```"), ("C", "body c")]


def test_chunks_carry_their_heading_and_respect_size():
    body = "word " * 400
    chunks = DocumentSplitter(SplitterSettings(300, 50)).split("doc.md", load_file("doc.md", f"# Guide\n## Install\n{body}".encode()))
    assert len(chunks) > 3
    assert all(c.text.startswith("Guide > Install\n") and c.heading == "Guide > Install" for c in chunks)
    assert all(len(c.text) <= 300 + len("Guide > Install\n") for c in chunks)


def test_chinese_text_splits_at_sentence_punctuation():
    text = ZH * 20
    chunks = DocumentSplitter(SplitterSettings(100, 0)).split("zh.txt", load_file("zh.txt", text.encode()))
    assert len(chunks) > 5
    assert all(c.text[-1] in "。！？" for c in chunks[:-1])


@pytest.mark.parametrize("size,overlap", [(10, 0), (500, 500), (500, -1)])
def test_splitter_settings_are_checked(size, overlap):
    with pytest.raises(ValueError):
        SplitterSettings(size, overlap)


@pytest.mark.parametrize(
    "raw,clean",
    [("../../etc/passwd", "passwd"), ("..\\..\\Windows\\win.ini", "win.ini"), ("/abs/path/file.md", "file.md"),
     ("ok name.pdf", "ok name.pdf"), ("evil\x00.md", "evil.md"), ("说明.md", "说明.md")],
)
def test_upload_names_lose_their_paths(raw, clean):
    assert safe_file_name(raw) == clean


@pytest.mark.parametrize("raw", ["", "..", "../", "   "])
def test_unusable_upload_names(raw):
    with pytest.raises(NameError_):
        safe_file_name(raw)


@pytest.mark.parametrize("name", ["../etc", "a/b", ".hidden", "", "x" * 65, "jobs", "a..b"])
def test_bad_knowledge_base_names(name):
    with pytest.raises(NameError_):
        check_kb_name(name)


def test_knowledge_base_names_allow_letters_digits_and_chinese():
    assert check_kb_name("team-docs_v2.1") == "team-docs_v2.1"
    assert check_kb_name("知识库") == "知识库"


def test_a_crash_while_saving_keeps_the_previous_version(tmp_path):
    first = save_version(tmp_path, lambda d: (d / "manifest.json").write_text('{"v": 1}'))

    def crash(folder):
        (folder / "manifest.json").write_text('{"v": 2, "partial')
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        save_version(tmp_path, crash)
    assert current_version(tmp_path) == first
    assert (first / "manifest.json").read_text() == '{"v": 1}'
    second = save_version(tmp_path, lambda d: (d / "manifest.json").write_text('{"v": 3}'))
    # the replaced version stays one save longer, for another instance that may be reading it
    assert current_version(tmp_path) == second and first.exists()
    third = save_version(tmp_path, lambda d: (d / "manifest.json").write_text('{"v": 4}'))
    assert current_version(tmp_path) == third and second.exists() and not first.exists()


def test_bm25_ranks_exact_terms_and_measures_query_coverage():
    from knowledge.lexical import BM25Index

    texts = [
        "install with pip install easycv==0.10.0 on linux",
        "the cat sat on the mat",
        "模型压缩包括量化和剪枝",
        "pip is a package manager; pip upgrades packages",
    ] + [f"filler text number {i} about cats and mats" for i in range(200)]
    index = BM25Index(texts)
    scores = index.scores("easycv 0.10.0")
    assert scores.argmax() == 0 and scores[1:].max() == 0
    assert index.scores("量化")[2] > 0 and index.scores("量化")[3] == 0
    pip = index.scores("pip")
    assert pip[3] > pip[0] > 0  # two mentions in a shorter text beat one
    assert index.coverage("pip install easycv", 0) == pytest.approx(1.0)
    assert 0 < index.coverage("pip install easycv", 3) < 0.5  # only the common term
    assert index.coverage("pip install easycv", 1) == 0.0
    assert index.coverage("nothing-here", 0) == 0.0 and BM25Index([]).scores("x").shape == (0,)
