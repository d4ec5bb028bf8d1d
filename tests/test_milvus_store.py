"""Knowledge bases in Milvus (Lite here): the same answers as FAISS, kept across restarts, refused by another
embedder, grounded answers with sources. The shared API suite runs on both stores in test_knowledge_api.py."""

from __future__ import annotations

import asyncio

import pytest
import requests

from chat import ChatService
from knowledge.config import KnowledgeConfig
from knowledge.embeddings import build_embedder
from knowledge.service import KnowledgeService, Upload
from knowledge.store import EmbeddingMismatchError
from tests.conftest import RAG_DEV, serve

DOCS = [RAG_DEV / "docs" / "easycv_README.md", RAG_DEV / "docs" / "deepspeed_advanced_install.pdf"]
QUESTIONS = ["How do I skip DeepSpeed's CUDA version mismatch check?", "What is EasyCV?",
             "Which environment variable pre-builds all DeepSpeed ops?", "How do I install EasyCV with pip?"]


def _milvus(path, embedder) -> KnowledgeService:
    return KnowledgeService(KnowledgeConfig(vector_store="milvus", milvus_uri=str(path)), embedder)


def _ingest(service: KnowledgeService, kb: str) -> None:
    job, future = service.submit(kb, [Upload(p.name, p.read_bytes()) for p in DOCS])
    future.result(timeout=600)
    assert job.state == "done", job.as_dict()


@pytest.fixture(scope="module")
def milvus_path(tmp_path_factory):
    return tmp_path_factory.mktemp("milvus") / "kb.db"


def test_milvus_ranks_like_faiss(embedder, tmp_path, milvus_path):
    faiss_service = KnowledgeService(KnowledgeConfig(knowledge_dir=str(tmp_path / "faiss")), embedder)
    milvus_service = _milvus(milvus_path, embedder)
    try:
        _ingest(faiss_service, "docs")
        _ingest(milvus_service, "docs")
        assert faiss_service.get("docs").chunk_count == milvus_service.get("docs").chunk_count > 20
        for question in QUESTIONS:
            by_faiss = asyncio.run(faiss_service.search("docs", question, 5))
            by_milvus = asyncio.run(milvus_service.search("docs", question, 5))
            assert [(h.file, h.text) for h in by_milvus] == [(h.file, h.text) for h in by_faiss], question
            assert [round(h.score, 4) for h in by_milvus] == [round(h.score, 4) for h in by_faiss]
            assert [h.keyword_score for h in by_milvus] == [h.keyword_score for h in by_faiss]
    finally:
        faiss_service.shutdown()
        milvus_service.shutdown()


def test_bases_survive_a_restart_and_another_embedder_is_refused(embedder, milvus_path):
    reopened = _milvus(milvus_path, embedder)  # the base from the previous test, written by another service object
    try:
        assert "docs" in reopened.names()
        hits = asyncio.run(reopened.search("docs", QUESTIONS[0], 3))
        assert hits[0].file == "deepspeed_advanced_install.pdf"
    finally:
        reopened.shutdown()
    other = _milvus(milvus_path, build_embedder("all-MiniLM-L6-v2"))
    try:
        with pytest.raises(EmbeddingMismatchError, match="multilingual-e5-small"):
            asyncio.run(other.search("docs", QUESTIONS[0], 3))
    finally:
        other.shutdown()


def test_grounded_answers_and_deletion_through_the_api(engine, embedder, tmp_path):
    service = _milvus(tmp_path / "api.db", embedder)
    chat = ChatService(engine, service)
    try:
        for live in serve(chat, None, knowledge=service):
            files = [("files", (p.name, p.read_bytes())) for p in DOCS]
            job = requests.post(f"{live.url}/api/knowledge/default/files?wait=true", files=files, timeout=600).json()
            assert job["state"] == "done"
            reply = requests.post(live.url, json={"prompt": QUESTIONS[0], "langchain": True, "do_sample": False,
                                                  "max_new_tokens": 24}, timeout=120).json()
            assert reply["sources"][0]["file"] == "deepspeed_advanced_install.pdf"
            assert any("DS_SKIP_CUDA_CHECK" in s["text"] for s in reply["sources"])
            unrelated = requests.post(live.url, json={"prompt": "What is a good recipe for sourdough bread?",
                                                      "langchain": True, "max_new_tokens": 24}, timeout=120).json()
            assert unrelated["sources"] == []  # the "no matching knowledge" reply, as with FAISS
            assert requests.delete(f"{live.url}/api/knowledge/default").status_code == 200
            assert requests.get(f"{live.url}/api/knowledge").json()["knowledge_bases"] == []
            assert requests.post(f"{live.url}/api/knowledge/default/search", json={"query": "x"}).status_code == 404
            service.catalog.client._client.close()  # Milvus goes away
            down = requests.get(f"{live.url}/api/knowledge")
            assert down.status_code == 503 and down.json()["error"]["code"] == "knowledge_store_unavailable"
            assert "Milvus" in down.json()["error"]["message"]
            health = requests.get(f"{live.url}/health")
            assert health.status_code == 200 and health.json()["knowledge"]["status"] == "unavailable"
    finally:
        chat.shutdown()
        try:
            service.shutdown()
        except Exception:
            pass  # its client was closed above
