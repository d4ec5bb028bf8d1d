"""Bases survive restarts, and refuse to be searched with another embedding model."""

import pytest
from sentence_transformers import SentenceTransformer, models

from knowledge.config import KnowledgeConfig
from knowledge.embeddings import SentenceEmbedder, embedded_model_dir
from knowledge.service import KnowledgeService, Upload
from knowledge.store import EmbeddingMismatchError
from tests.conftest import RAG_DEV


def _ingest(service, kb, uploads):
    job, future = service.submit(kb, uploads)
    future.result(timeout=600)
    assert job.state == "done", job.as_dict()
    return job


@pytest.fixture(scope="module")
def other_embedder(tmp_path_factory) -> SentenceEmbedder:
    """A genuinely different sentence-transformers model: MiniLM's encoder, CLS pooling, a 128-d projection."""
    folder = tmp_path_factory.mktemp("models") / "minilm-cls-128"
    encoder = models.Transformer(str(embedded_model_dir()))
    pooling = models.Pooling(encoder.get_embedding_dimension(), pooling_mode="cls")
    dense = models.Dense(encoder.get_embedding_dimension(), 128)
    SentenceTransformer(modules=[encoder, pooling, dense]).save(str(folder))
    return SentenceEmbedder(str(folder))


def test_restart_loads_everything(tmp_path, embedder):
    config = KnowledgeConfig(knowledge_dir=str(tmp_path))
    first = KnowledgeService(config, embedder)
    pdf = (RAG_DEV / "docs" / "deepspeed_advanced_install.pdf").read_bytes()
    _ingest(first, "docs", [Upload("install.pdf", pdf), Upload("zoo.md", b"# Zoo\nThe zoo keeps three okapis.")])
    before = first.get("docs").files()
    first.shutdown()

    second = KnowledgeService(config, embedder)
    assert second.names() == ["docs"] and second.get("docs").files() == before
    hits = second._search(second.get("docs"), "How many okapis does the zoo keep?", 2)
    assert hits[0].file == "zoo.md" and "okapis" in hits[0].text
    job = _ingest(second, "docs", [Upload("zoo.md", b"# Zoo\nThe zoo keeps three okapis.")])
    assert job.files[0].status == "unchanged"  # the manifest's sha256 survived the restart
    second.shutdown()


def test_other_embedding_model_is_refused_then_rebuilt(tmp_path, embedder, other_embedder):
    config = KnowledgeConfig(knowledge_dir=str(tmp_path))
    built = KnowledgeService(config, embedder)
    _ingest(built, "docs", [Upload("zoo.md", b"# Zoo\nThe zoo keeps three okapis."), Upload("sea.md", b"# Sea\nWhales sing.")])
    built.shutdown()

    reopened = KnowledgeService(config, other_embedder)
    base = reopened.get("docs")
    problem = base.mismatch()
    assert embedder.name in problem and "384-d" in problem and "128-d" in problem and "rebuild" in problem
    with pytest.raises(EmbeddingMismatchError):
        reopened._search(base, "okapis", 1)
    job, future = reopened.submit("docs", [Upload("new.md", b"# New\ntext")])
    future.result(timeout=60)
    assert job.state == "failed" and "was built with" in job.error
    assert base.summary()["usable"] is False

    assert base.rebuild() == 2
    assert base.manifest["embedding"] == {"model": other_embedder.name, "dimension": 128}
    assert {h.file for h in reopened._search(base, "okapis", 2)} == {"zoo.md", "sea.md"}
    reopened.shutdown()
    # and the rebuilt base is now the one on disk
    assert KnowledgeService(config, other_embedder).get("docs").mismatch() is None
