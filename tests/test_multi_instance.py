"""Two service instances behind one endpoint, as deployed at scale: one inference engine (here the session's
shared server, reached with --backend openai), one PostgreSQL for conversations, one shared knowledge folder.

Both instances are real processes started from the command line.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
import uuid

import pytest
import requests

from tests.conftest import ROOT, free_port
from tests.test_cli import SERVER


def _start(engine_url: str, history_db: str, knowledge_dir, data_dir, log_path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([*SERVER, "--port", str(port), "--api-only", "--backend", "openai", "--engine-url",
                             engine_url, "--history-db", history_db, "--service-name", "multi",
                             "--knowledge-dir", str(knowledge_dir), "--data-dir", str(data_dir)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return f"http://127.0.0.1:{port}", proc


@pytest.fixture(scope="module")
def instances(server, postgres, tmp_path_factory):
    shared = tmp_path_factory.mktemp("shared-knowledge")
    started = [_start(server.url + "/v1", postgres.url, shared, tmp_path_factory.mktemp(f"data-{name}"),
                      tmp_path_factory.mktemp("logs") / f"{name}.log") for name in "ab"]
    try:
        deadline = time.monotonic() + 240
        for url, proc in started:
            while True:
                assert proc.poll() is None, f"instance at {url} exited"
                try:
                    if requests.get(url + "/health/ready", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline, "instances did not start"
                time.sleep(0.5)
        yield [url for url, _ in started]
    finally:
        for _, proc in started:
            proc.terminate()
        for _, proc in started:
            proc.wait(30)


def _upload(url: str, kb: str, name: str, text: str) -> dict:
    return requests.post(f"{url}/api/knowledge/{kb}/files?wait=true", files=[("files", (name, text.encode()))],
                         timeout=300).json()


def test_a_document_uploaded_through_a_is_retrieved_through_b(instances):
    a, b = instances
    job = _upload(a, "fleet", "harbor.txt", "The Osterby harbor crane lifts at most 42 tonnes and was built in 1987.")
    assert job["state"] == "done" and job["files"][0]["status"] == "added"
    listed = {kb["name"]: kb for kb in requests.get(b + "/api/knowledge").json()["knowledge_bases"]}
    assert listed["fleet"]["files"] == 1
    reply = requests.post(b, json={"prompt": "How many tonnes can the Osterby harbor crane lift?", "langchain": True,
                                   "kb": "fleet", "do_sample": False, "max_new_tokens": 30}, timeout=120).json()
    assert reply["sources"] and reply["sources"][0]["file"] == "harbor.txt" and "42" in reply["sources"][0]["text"]
    # a replacement through B is what A retrieves next
    job = _upload(b, "fleet", "harbor.txt", "The Osterby harbor crane lifts at most 55 tonnes since its 2019 refit.")
    assert job["files"][0]["status"] == "replaced"
    hits = requests.post(f"{a}/api/knowledge/fleet/search", json={"query": "Osterby crane tonnes", "top_k": 1}).json()
    assert "55 tonnes" in str(hits) and "42 tonnes" not in str(hits)


def test_uploads_through_both_at_once_lose_nothing(instances):
    a, b = instances
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = list(pool.map(lambda args: _upload(*args), [
            (a, "together", f"a{i}.txt", f"Instance A file {i} says the signal code is A-{i}-alpha.") for i in range(3)
        ] + [
            (b, "together", f"b{i}.txt", f"Instance B file {i} says the signal code is B-{i}-bravo.") for i in range(3)
        ]))
    assert all(j["state"] == "done" for j in jobs), jobs
    for url in (a, b):
        files = {f["name"] for f in requests.get(f"{url}/api/knowledge/together/files").json()["files"]}
        assert files == {"a0.txt", "a1.txt", "a2.txt", "b0.txt", "b1.txt", "b2.txt"}


def test_a_conversation_started_on_a_continues_on_b(instances):
    a, b = instances
    sid = uuid.uuid4().hex
    headers = {"X-Session-Id": sid, "X-User-Id": "alice"}
    first = requests.post(a, json={"prompt": "My ship is called the Kittiwake.", "do_sample": False,
                                   "max_new_tokens": 16}, headers=headers, timeout=120)
    assert first.status_code == 200
    second = requests.post(b, json={"prompt": "What is my ship called?", "do_sample": False, "max_new_tokens": 16},
                           headers=headers, timeout=120).json()
    alone = requests.post(b, json={"prompt": "What is my ship called?", "do_sample": False, "max_new_tokens": 16,
                                   "history": []}, timeout=120).json()
    assert second["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 10  # turn 1, stored by A, was used
    session = requests.get(f"{a}/api/sessions/{sid}", headers={"X-User-Id": "alice"}).json()
    assert [m["content"] for m in session["messages"] if m["role"] == "user"] == [
        "My ship is called the Kittiwake.", "What is my ship called?"]


def test_a_base_deleted_through_a_is_gone_on_b(instances):
    a, b = instances
    assert _upload(a, "short-lived", "x.txt", "Temporary note about the lighthouse.")["state"] == "done"
    assert "short-lived" in {k["name"] for k in requests.get(b + "/api/knowledge").json()["knowledge_bases"]}
    assert requests.delete(f"{a}/api/knowledge/short-lived").status_code == 200
    assert "short-lived" not in {k["name"] for k in requests.get(b + "/api/knowledge").json()["knowledge_bases"]}
    assert requests.post(f"{b}/api/knowledge/short-lived/search", json={"query": "lighthouse"}).status_code == 404
