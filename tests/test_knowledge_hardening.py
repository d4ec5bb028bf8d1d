"""Hostile files and folders: no pickle, bounded parsing in a child process, jobs that can be stopped,
deletion that sticks, saves that are all-or-nothing."""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from knowledge.config import KnowledgeConfig
from knowledge.persistence import CURRENT
from knowledge.service import KnowledgeService, Upload
from tests.conftest import ROOT, serve


def _service(tmp_path: Path, embedder, **config) -> KnowledgeService:
    return KnowledgeService(KnowledgeConfig(knowledge_dir=str(tmp_path), **config), embedder)


def _wait(job, future, timeout: float = 300):
    future.result(timeout=timeout)
    return job


def _state(service, job_id: str, wanted: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while service.jobs.get(job_id).state not in wanted:
        assert time.monotonic() < deadline, service.jobs.get(job_id).as_dict()
        time.sleep(0.05)


def _slow_text(chunks: int = 1500) -> bytes:
    """Text that splits into `chunks` chunks: embedding it takes tens of seconds on two cores."""
    return "".join(f"Paragraph {i} about topic {i % 97} says something worth finding. " * 12 + "\n\n"
                   for i in range(chunks)).encode()


# ---- stored data: no pickle, no path games ------------------------------------------------


class _Exploit:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_a_knowledge_folder_is_never_loaded(tmp_path, embedder):
    version = tmp_path / "kb" / "legacy" / "v1"
    version.mkdir(parents=True)
    marker = tmp_path / "pwned"
    (version / "index.pkl").write_bytes(pickle.dumps(_Exploit(str(marker))))
    (version / "index.faiss").write_bytes(b"\0" * 64)
    (version / "manifest.json").write_text(json.dumps({
        "format": 1, "name": "legacy", "files": {"a.md": {"sha256": "x", "size": 1, "chunk_ids": ["c1"]}},
        "embedding": {"model": embedder.name, "dimension": embedder.dimension}, "splitter": {}, "updated_at": None}))
    (version.parent / CURRENT).write_text("v1")

    service = _service(tmp_path / "kb", embedder)
    try:
        assert not marker.exists()
        summary = {s["name"]: s for s in service.summaries()}["legacy"]
        assert summary["usable"] is False
        assert "pickle" in summary["problem"] and "upload its files again" in summary["problem"]
        job, future = service.submit("legacy", [Upload("b.md", b"# B\ntext")])
        assert _wait(job, future).state == "failed" and "pickle" in job.error
        service.delete_base("legacy")
        assert not (tmp_path / "kb" / "legacy").exists() and not marker.exists()
    finally:
        service.shutdown()


def test_the_version_pointer_cannot_leave_the_base(tmp_path, embedder):
    root = tmp_path / "kb"
    first = _service(root, embedder)
    _wait(*first.submit("secret", [Upload("secret.md", b"# Secret\nThe vault code is 4417.")]))
    _wait(*first.submit("mine", [Upload("mine.md", b"# Mine\nNothing to see.")]))
    first.shutdown()
    for pointer in ("../secret/v1", str(root / "secret" / "v1"), "v1/../../secret/v1", "v1\n/etc"):
        (root / "mine" / CURRENT).write_text(pointer)
        reopened = _service(root, embedder)
        try:
            files = [f["name"] for f in reopened.get("mine").files()]
            assert files == ["mine.md"], pointer  # its own newest version, never the other base's
        finally:
            reopened.shutdown()


def test_a_doctored_index_file_is_refused_not_parsed(tmp_path, embedder):
    root = tmp_path / "kb"
    service = _service(root, embedder)
    _wait(*service.submit("docs", [Upload("a.md", b"# A\nAlpha text.")]))
    service.shutdown()
    index = next((root / "docs").glob("v*/index.faiss"))
    index.write_bytes(index.read_bytes() + b"\0" * 100_000)
    reopened = _service(root, embedder)
    try:
        assert "inconsistent" in reopened.get("docs").summary()["problem"]
    finally:
        reopened.shutdown()


# ---- uploads: per-file results, bombs, caps, a parser that crashes or runs away ---------------


def _zip_bomb(inflated_mib: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as package:
        package.writestr("[Content_Types].xml", "<Types/>")
        with package.open("word/document.xml", "w") as entry:
            block = b"\0" * 2**20
            for _ in range(inflated_mib):
                entry.write(block)
    return out.getvalue()


def _many_page_pdf(pages: int) -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=200, height=200)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_bad_files_fail_alone_with_clear_reasons(tmp_path, embedder):
    service = _service(tmp_path, embedder, max_chunks_per_file=50)
    bomb = _zip_bomb(300)
    assert len(bomb) < 1_000_000
    uploads = [
        Upload("bomb.docx", bomb),
        Upload("long.pdf", _many_page_pdf(2000)),
        Upload("corrupt.docx", b"PK\x03\x04" + os.urandom(5000)),
        Upload("fake.docx", _zip_with({"hello.txt": "not a word document"})),
        Upload("huge.txt", b"A sentence of text. " * 10_000),
        Upload("good.md", b"# Good\nThis one is fine and says okapi."),
    ]
    try:
        job = _wait(*service.submit("docs", uploads))
        results = {f.name: f for f in job.files}
        assert job.state == "done"
        assert results["good.md"].status == "added" and results["good.md"].chunks == 1
        assert "unpacks to 300 MiB" in results["bomb.docx"].reason
        assert "2000 pages" in results["long.pdf"].reason and "--max-pages-per-file" in results["long.pdf"].reason
        assert results["corrupt.docx"].reason.startswith("not a valid .docx file")
        assert results["fake.docx"].reason.startswith("not a valid .docx file")
        assert "the limit is 50" in results["huge.txt"].reason
        for name in ("bomb.docx", "long.pdf", "corrupt.docx", "fake.docx", "huge.txt"):
            assert results[name].status == "failed"
            # a sentence, not the parser's internals
            assert "Traceback" not in results[name].reason and "KeyError" not in results[name].reason
        assert [f["name"] for f in service.get("docs").files()] == ["good.md"]
    finally:
        service.shutdown()


def _zip_with(entries: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as package:
        for name, text in entries.items():
            package.writestr(name, text)
    return out.getvalue()


def test_a_parser_crash_fails_one_file_and_the_next_files_are_parsed(tmp_path, embedder):
    service = _service(tmp_path, embedder, max_chunks_per_file=100_000)
    try:
        job, future = service.submit("docs", [Upload("runaway.txt", b"a" * (24 * 2**20)),
                                               Upload("after.md", b"# After\nParsed by a fresh parser process.")])
        _state(service, job.id, {"parsing"})
        deadline = time.monotonic() + 30
        while service._sandbox._process is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the ~20 s this file takes to split
        os.kill(service._sandbox._process.pid, signal.SIGKILL)  # what the kernel's OOM killer would do
        _wait(job, future)
        results = {f.name: f for f in job.files}
        assert results["runaway.txt"].status == "failed" and "parser stopped" in results["runaway.txt"].reason
        assert results["after.md"].status == "added"
    finally:
        service.shutdown()


def test_a_job_past_its_time_limit_is_stopped(tmp_path, embedder):
    service = _service(tmp_path, embedder, ingest_timeout=3, max_chunks_per_file=100_000)
    try:
        started = time.monotonic()
        job = _wait(*service.submit("docs", [Upload("runaway.txt", b"a" * (24 * 2**20))]))
        assert job.state == "failed" and "--ingest-timeout" in job.error
        assert time.monotonic() - started < 15
        assert service.get("docs").files() == []
        # the parser was restarted: the next job works
        assert _wait(*service.submit("docs", [Upload("ok.md", b"# Ok\nfine")])).state == "done"
    finally:
        service.shutdown()


@pytest.fixture
def queue_server(chat_service, embedder, tmp_path):
    service = _service(tmp_path, embedder, max_ingest_jobs=1)
    yield from serve(chat_service, None, knowledge=service)
    service.shutdown()


def test_a_full_job_queue_is_503_and_jobs_can_be_cancelled(queue_server):
    url = queue_server.url + "/api/knowledge"
    first = requests.post(f"{url}/slow/files", files=[("files", ("slow.md", _slow_text()))], timeout=60)
    assert first.status_code == 202
    second = requests.post(f"{url}/other/files", files=[("files", ("b.md", b"# B\nb"))], timeout=60)
    assert second.status_code == 503 and int(second.headers["retry-after"]) > 0
    assert second.json()["error"]["code"] == "ingest_queue_full"

    job_id = first.json()["id"]
    deadline = time.monotonic() + 120
    while requests.get(f"{url}/jobs/{job_id}", timeout=10).json()["state"] != "embedding":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelled = requests.delete(f"{url}/jobs/{job_id}", timeout=10)
    assert cancelled.status_code == 200
    deadline = time.monotonic() + 15  # the job stops at its next embedding batch
    while (job := requests.get(f"{url}/jobs/{job_id}", timeout=10).json())["state"] != "cancelled":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["files"][0]["status"] == "cancelled"
    assert requests.get(f"{url}/slow/files", timeout=10).json()["files"] == []  # nothing of it was saved
    assert requests.delete(f"{url}/jobs/nope", timeout=10).status_code == 404
    # the queue has room again
    assert requests.post(f"{url}/other/files?wait=true", files=[("files", ("b.md", b"# B\nb"))], timeout=60).status_code == 200


def test_deleting_a_base_during_its_upload_does_not_bring_it_back(tmp_path, embedder):
    service = _service(tmp_path, embedder)
    try:
        _wait(*service.submit("race", [Upload("first.md", b"# First\nAlready there.")]))
        job, future = service.submit("race", [Upload("slow.md", _slow_text(600))])
        _state(service, job.id, {"embedding"})
        service.delete_base("race")
        _wait(job, future)
        assert job.state == "cancelled"
        time.sleep(0.5)
        assert "race" not in service.names() and not (tmp_path / "race").exists()
        # a fresh upload under the same name starts from nothing
        _wait(*service.submit("race", [Upload("new.md", b"# New\nOnly me.")]))
        assert [f["name"] for f in service.get("race").files()] == ["new.md"]
    finally:
        service.shutdown()


def test_a_failed_save_changes_nothing_on_disk_or_in_memory(tmp_path, embedder):
    service = _service(tmp_path, embedder)
    try:
        _wait(*service.submit("docs", [Upload("a.md", b"# A\nThe aardvark digs.")]))
        obstacle = tmp_path / "docs" / ".staging-v2"
        obstacle.write_text("a file where the next version's folder must go")  # the disk refuses the save
        job = _wait(*service.submit("docs", [Upload("b.md", b"# B\nThe bonobo climbs.")]))
        assert job.state == "failed" and "nothing was changed" in job.error
        base = service.get("docs")
        assert [f["name"] for f in base.files()] == ["a.md"]
        assert {h.file for h in service._search(base, "bonobo climbs", 5)} == {"a.md"}  # memory rolled back too
        obstacle.unlink()
        _wait(*service.submit("docs", [Upload("c.md", b"# C\nThe capybara swims.")]))
        assert [f["name"] for f in service.get("docs").files()] == ["a.md", "c.md"]
    finally:
        service.shutdown()


_SAVER = """
import sys, itertools
sys.path.insert(0, {root!r})
from knowledge.config import KnowledgeConfig
from knowledge.embeddings import build_embedder
from knowledge.service import KnowledgeService, Upload
service = KnowledgeService(KnowledgeConfig(knowledge_dir={folder!r}), build_embedder(None))
print("ready", flush=True)
for i in itertools.count():
    job, future = service.submit("docs", [Upload(f"f{{i % 7}}.md", f"# File {{i}}\\nRevision {{i}} of this file.".encode())])
    future.result()
"""


def test_kill_9_during_saves_leaves_a_whole_version(tmp_path, embedder):
    folder = tmp_path / "kb"
    script = _SAVER.format(root=str(ROOT), folder=str(folder))
    for kill_after in (0.3, 0.7, 1.1, 1.6, 2.3):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(kill_after)
        process.send_signal(signal.SIGKILL)
        process.wait()
        reopened = _service(folder, embedder)
        try:
            base = reopened.get("docs") if "docs" in reopened.names() else None
            if base is not None:
                assert base.problem is None, base.problem
                files = base.files()
                assert base._vectors.index.ntotal == base.chunk_count == sum(f["chunks"] for f in files)
                # and the next save works on top of whatever the kill left behind
                _wait(*reopened.submit("docs", [Upload("after.md", b"# After\nfine")]))
                assert "after.md" in [f["name"] for f in reopened.get("docs").files()]
        finally:
            reopened.shutdown()


# ---- names ---------------------------------------------------------------------------------


def test_names_are_checked_whole_and_shown_clean(server):
    response = requests.post(f"{server.url}/api/knowledge/docs%0A/files", files=[("files", ("a.md", b"# A\na"))], timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "kb"
    spoofed = "invoice\u202egpj.exe\u200b.md"
    job = requests.post(f"{server.url}/api/knowledge/names-check/files?wait=true",
                        files=[("files", (spoofed, b"# Invoice\ntotal 12"))], timeout=120).json()
    assert job["files"][0]["name"] == "invoicegpj.exe.md" and job["files"][0]["status"] == "added"
