"""The knowledge-base HTTP API against a live server, real FAISS on disk."""

import time
import uuid

import pytest
import requests

from knowledge.config import KnowledgeConfig
from knowledge.service import KnowledgeService
from tests.conftest import RAG_DEV, serve

DOCS = RAG_DEV / "docs"


@pytest.fixture(scope="module", params=["faiss", "milvus"])
def kb_server(request, tmp_path_factory):
    """The same API suite on both stores: the session's FAISS server, and one whose bases live in Milvus Lite."""
    if request.param == "faiss":
        yield request.getfixturevalue("server")
        return
    from chat import ChatService

    service = KnowledgeService(KnowledgeConfig(vector_store="milvus", milvus_uri=str(
        tmp_path_factory.mktemp("milvus") / "milvus.db")), request.getfixturevalue("embedder"))
    chat = ChatService(request.getfixturevalue("engine"), service)
    try:
        yield from serve(chat, None, knowledge=service)
    finally:
        chat.shutdown()
        service.shutdown()


def _kb() -> str:
    return f"kb-{uuid.uuid4().hex[:8]}"


def _upload(server, kb, files, wait=True, **kw):
    url = f"{server.url}/api/knowledge/{kb}/files" + ("?wait=true" if wait else "")
    return requests.post(url, files=[("files", f) for f in files], headers=server.headers(), timeout=600, **kw)


def _search(server, kb, query, top_k=3):
    r = requests.post(f"{server.url}/api/knowledge/{kb}/search", json={"query": query, "top_k": top_k}, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["hits"]


def test_upload_job_reports_progress_until_done(kb_server):
    kb = _kb()
    response = _upload(kb_server, kb, [(p.name, p.read_bytes()) for p in [DOCS / "easycv_README.md", DOCS / "deepspeed_advanced_install.pdf"]], wait=False)
    assert response.status_code == 202
    job = response.json()
    assert response.headers["Location"] == f"/api/knowledge/jobs/{job['id']}"
    seen_states = {job["state"]}
    deadline = time.monotonic() + 300
    while job["state"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        job = requests.get(f"{kb_server.url}/api/knowledge/jobs/{job['id']}", timeout=10).json()
        seen_states.add(job["state"])
    assert job["state"] == "done" and job["chunks_done"] == job["chunks_total"] > 10
    assert {f["name"]: f["status"] for f in job["files"]} == {"easycv_README.md": "added", "deepspeed_advanced_install.pdf": "added"}
    assert seen_states & {"queued", "parsing", "embedding", "saving"}

    listing = requests.get(f"{kb_server.url}/api/knowledge/{kb}/files", timeout=10).json()
    assert {f["name"]: f["chunks"] for f in listing["files"]} == {f["name"]: f["chunks"] for f in job["files"]}
    assert listing["files"][0]["sha256"] and listing["chunks"] == job["chunks_total"]
    bases = {b["name"]: b for b in requests.get(f"{kb_server.url}/api/knowledge", timeout=10).json()["knowledge_bases"]}
    assert bases[kb]["files"] == 2 and bases[kb]["embedding"] == {"model": "intfloat/multilingual-e5-small", "dimension": 384}


def test_search_returns_text_file_page_and_score(kb_server):
    kb = _kb()
    _upload(kb_server, kb, [("install.pdf", (DOCS / "deepspeed_advanced_install.pdf").read_bytes()), ("easycv.md", (DOCS / "easycv_README.md").read_bytes())])
    hits = _search(kb_server, kb, "How do I pre-build all DeepSpeed ops at install time?")
    assert hits[0]["file"] == "install.pdf" and isinstance(hits[0]["page"], int)
    assert any("DS_BUILD_OPS=1" in h["text"] for h in hits)
    assert hits[0]["score"] > 0.35 and hits[0]["relevant"] is True
    unrelated = _search(kb_server, kb, "What is a good recipe for sourdough bread?")
    assert not any(h["relevant"] for h in unrelated)


def test_unchanged_reupload_is_a_noop_and_changed_file_replaces_chunks(kb_server):
    kb = _kb()
    first = _upload(kb_server, kb, [("notes.md", b"# Notes\nThe launch code is ALPHA-7731.\n")]).json()
    again = _upload(kb_server, kb, [("notes.md", b"# Notes\nThe launch code is ALPHA-7731.\n")]).json()
    assert first["files"][0]["status"] == "added" and again["files"][0]["status"] == "unchanged"
    assert again["chunks_total"] == 0  # nothing was embedded again
    changed = _upload(kb_server, kb, [("notes.md", b"# Notes\nThe launch code is BRAVO-9902.\n")]).json()
    assert changed["files"][0]["status"] == "replaced"
    texts = " ".join(h["text"] for h in _search(kb_server, kb, "launch code", top_k=10))
    assert "BRAVO-9902" in texts and "ALPHA-7731" not in texts
    assert requests.get(f"{kb_server.url}/api/knowledge/{kb}/files", timeout=10).json()["chunks"] == 1


def test_delete_file_removes_its_vectors(kb_server):
    kb = _kb()
    _upload(kb_server, kb, [("a.md", b"# A\nZebras live in Africa."), ("b.md", b"# B\nPenguins live in Antarctica.")])
    r = requests.delete(f"{kb_server.url}/api/knowledge/{kb}/files/a.md", timeout=30)
    assert r.status_code == 200 and r.json()["chunks_removed"] == 1
    hits = _search(kb_server, kb, "Where do zebras live?", top_k=5)
    assert [h["file"] for h in hits] == ["b.md"]
    assert requests.delete(f"{kb_server.url}/api/knowledge/{kb}/files/a.md", timeout=30).status_code == 404


def test_bad_files_fail_alone(kb_server):
    kb = _kb()
    job = _upload(kb_server, kb, [
        ("good.md", b"# Good\nThis file is fine."),
        ("broken.pdf", b"%PDF-1.4 nonsense"),
        ("fake.docx", b"not a zip"),
        ("empty.txt", b""),
        ("sheet.xlsx", b"PK"),
    ]).json()
    status = {f["name"]: (f["status"], f["reason"]) for f in job["files"]}
    assert job["state"] == "done"
    assert status["good.md"] == ("added", None)
    assert "not a readable PDF" in status["broken.pdf"][1]
    assert "not a zip" in status["fake.docx"][1]
    assert "empty" in status["empty.txt"][1]
    assert "unsupported" in status["sheet.xlsx"][1]
    assert [f["name"] for f in requests.get(f"{kb_server.url}/api/knowledge/{kb}/files", timeout=10).json()["files"]] == ["good.md"]


def test_chinese_names_headings_and_text(kb_server):
    kb = f"知识库-{uuid.uuid4().hex[:6]}"
    heading = "长城" * 300  # 600 characters, 1800 bytes of UTF-8: past Milvus's 1024-byte field
    body = f"# {heading}\n\n长城是中国古代的军事防御工程，总长度超过两万公里。\n".encode()
    job = _upload(kb_server, kb, [("长城介绍.md", body)]).json()
    assert job["state"] == "done" and job["files"][0]["status"] == "added", job
    hits = _search(kb_server, kb, "长城有多长？")
    assert hits[0]["file"] == "长城介绍.md" and "两万公里" in hits[0]["text"]


def test_path_traversal_names_stay_inside_the_base(server, knowledge):
    kb = _kb()
    before = {p for p in knowledge.catalog.root.parent.rglob("*")}
    job = _upload(server, kb, [("../../escape.md", b"# Escape\nnot outside"), ("..\\..\\win.md", b"# Win\nstill inside")]).json()
    assert sorted(f["name"] for f in job["files"]) == ["escape.md", "win.md"]
    after = {p for p in knowledge.catalog.root.parent.rglob("*")}
    assert all(knowledge.catalog.root in p.parents for p in after - before)
    assert not any(p.name in ("escape.md", "win.md") for p in after)  # uploads are never written as files


def test_bad_requests(server):
    r = _upload(server, "bad name!", [("a.md", b"x")])
    assert r.status_code == 400 and r.json()["error"]["param"] == "kb"
    assert _upload(server, "..%2Fetc", [("a.md", b"x")]).status_code in (400, 404)
    r = requests.post(f"{server.url}/api/knowledge/{_kb()}/files", data={"nothing": "here"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "files"
    r = requests.post(f"{server.url}/api/knowledge/nosuchbase/search", json={"query": "x"}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["param"] == "kb"
    r = requests.post(f"{server.url}/api/knowledge/nosuchbase/search", json={"query": ""}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "query"
    r = requests.post(f"{server.url}/api/knowledge/nosuchbase/search", json={"query": "x", "top_k": 0}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    assert requests.get(f"{server.url}/api/knowledge/jobs/doesnotexist", timeout=10).status_code == 404
    assert requests.delete(f"{server.url}/api/knowledge/nosuchbase", timeout=10).status_code == 404


@pytest.fixture(scope="module")
def small_limits_server(chat_service, embedder, tmp_path_factory):
    config = KnowledgeConfig(knowledge_dir=str(tmp_path_factory.mktemp("limits")), max_upload_mb=0.01, max_upload_files=2)
    service = KnowledgeService(config, embedder)
    yield from serve(chat_service, None, knowledge=service)
    service.shutdown()


def test_upload_limits_give_413(small_limits_server):
    too_big = _upload(small_limits_server, "limits", [("big.txt", b"a" * 20_000)])
    assert too_big.status_code == 413 and "big.txt" in too_big.json()["error"]["message"]
    too_many = _upload(small_limits_server, "limits", [(f"{i}.txt", b"x") for i in range(3)])
    assert too_many.status_code == 413 and "limit is 2" in too_many.json()["error"]["message"]
    ok = _upload(small_limits_server, "limits", [("fine.txt", b"small and fine")])
    assert ok.status_code == 200 and ok.json()["files"][0]["status"] == "added"


def test_knowledge_api_requires_token(secured_server):
    assert requests.get(f"{secured_server.url}/api/knowledge", timeout=10).status_code == 401
    r = requests.get(f"{secured_server.url}/api/knowledge", headers=secured_server.headers(), timeout=10)
    assert r.status_code == 200
