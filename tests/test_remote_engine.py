"""`--backend openai`: another server does the model work, every surface above it unchanged.

The engine here is a second ChatLLM-WebUI (the session's shared server on the
embedded model); failure paths use a scripted upstream (tests/fake_engine.py).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import requests
import websockets

from api.config import ServerConfig
from chat import ChatService
from engine.remote import RemoteEngine, RemoteSettings, ServerFacts, sampling_body
from engine.remote_connect import connect_remote
from engine.types import ModelLoadError, SamplingParams
from tests.conftest import _ServerThread, free_port, serve
from tests.fake_engine import Script, fake_engine_app

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def front(server, knowledge):
    """A ChatLLM-WebUI whose engine is the shared server, reached over HTTP."""
    remote = connect_remote(RemoteSettings(url=server.url + "/v1", wait=10))
    chat = ChatService(remote, knowledge)
    try:
        yield from serve(chat, None, knowledge=knowledge)
    finally:
        chat.shutdown()
        remote.shutdown()


def _fake(script: Script):
    port = free_port()
    return _ServerThread(fake_engine_app(script), ServerConfig(port=port)), f"http://127.0.0.1:{port}/v1"


def test_model_name_and_context_come_from_the_engine(front, server):
    direct = requests.get(server.url + "/v1/models").json()["data"][0]
    via = requests.get(front.url + "/v1/models").json()["data"][0]
    assert via["id"] == direct["id"] == "SmolLM2-135M-Instruct"
    assert via["max_model_len"] == direct["max_model_len"] == 8192
    health = requests.get(front.url + "/health").json()["engine"]
    assert health["backend"] == "openai" and health["ready"] is True
    assert health["token_counts"] == "server /tokenize"
    assert set(health["sampling_extensions"]) == {"top_k", "repetition_penalty", "ignore_eos"}


def test_greedy_answer_and_usage_match_the_engine_itself(front, server):
    body = {"prompt": QUESTION, "do_sample": False, "max_new_tokens": 30}
    direct = requests.post(server.url, json=body, timeout=300).json()
    via = requests.post(front.url, json=body, timeout=300).json()
    assert "Paris" in via["response"]
    assert via["response"] == direct["response"]
    assert via["usage"] == direct["usage"]  # the engine counted the same prompt: nothing was lost on the way


def test_openai_stream_arrives_token_by_token(front, server):
    client = openai.OpenAI(api_key="x", base_url=front.url + "/v1", max_retries=0, timeout=300)
    stamps, pieces = [], []
    stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", stream=True, max_tokens=24, temperature=0,
                                            messages=[{"role": "user", "content": "Count from one to twenty."}],
                                            extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            stamps.append(time.perf_counter())
    assert usage.completion_tokens == 24  # ignore_eos reached the engine
    assert len(pieces) >= 20  # one event per token, not one lump at the end
    assert stamps[-1] - stamps[0] > 0.05
    direct = openai.OpenAI(api_key="x", base_url=server.url + "/v1", max_retries=0, timeout=300)
    same = direct.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=24, temperature=0,
                                          messages=[{"role": "user", "content": "Count from one to twenty."}],
                                          extra_body={"ignore_eos": True})
    assert "".join(pieces) == same.choices[0].message.content


def test_eas_websocket_and_raw_completions_through_the_front(front):
    async def converse():
        async with websockets.connect(front.ws_url) as ws:
            await ws.send(json.dumps({"prompt": QUESTION, "do_sample": False, "max_new_tokens": 20}))
            frames = []
            while (msg := await asyncio.wait_for(ws.recv(), 120)) != "<EOS>":
                frames.append(msg)
            return frames

    frames = asyncio.run(converse())
    assert frames and "Paris" in frames[-1]  # cumulative answer text, as the documented client reads it
    reply = requests.post(front.url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 6,
                                                               "temperature": 0}, timeout=120).json()
    assert reply["choices"][0]["text"].strip() and reply["usage"]["completion_tokens"] >= 1


def test_knowledge_answers_with_sources_through_the_front(front):
    text = ("The Zephyr-9 ground station relays telemetry from the Kestrel probe. Its uplink runs at 7.3 GHz "
            "and it was commissioned in Reykjavik.").encode()
    job = requests.post(front.url + "/api/knowledge/remote-kb/files?wait=true",
                        files=[("files", ("zephyr.txt", text))], timeout=300).json()
    assert job["state"] == "done", job
    reply = requests.post(front.url, json={"prompt": "At what frequency does the Zephyr-9 uplink run?", "langchain": True,
                                           "kb": "remote-kb", "do_sample": False, "max_new_tokens": 30}, timeout=300).json()
    assert reply["sources"] and reply["sources"][0]["file"] == "zephyr.txt"
    assert "7.3" in reply["response"]


def test_client_disconnect_stops_the_engine_side_at_once(front, engine):
    before = engine.health()["tokens_generated"]
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", front.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Write a very long story."}], "stream": True,
                "max_tokens": 2000, "ignore_eos": True}) as response:
            seen = 0
            for line in response.iter_lines():
                if line.startswith("data:") and '"content"' in line:
                    seen += 1
                    if seen == 3:
                        break
    deadline = time.monotonic() + 10
    while engine.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.health()["running"] == 0
    time.sleep(0.5)
    assert engine.health()["tokens_generated"] - before < 400  # far from the 2000 asked for


def test_sampling_fields_are_mapped():
    all_ = frozenset({"top_k", "repetition_penalty", "ignore_eos"})
    body, ignored = sampling_body(SamplingParams(max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9,
                                                 repetition_penalty=1.2, seed=3, stop=("END",)), all_)
    assert body == {"max_tokens": 7, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.2,
                    "seed": 3, "stop": ["END"]} and ignored == []
    greedy, _ = sampling_body(SamplingParams(do_sample=False, temperature=0.9, top_k=30), all_)
    assert greedy["temperature"] == 0.0 and "top_k" not in greedy and "top_p" not in greedy
    _, ignored = sampling_body(SamplingParams(top_k=5, repetition_penalty=1.1), frozenset())
    assert ignored == ["repetition_penalty", "top_k"]


def test_fields_a_strict_engine_refuses_are_reported_not_dropped_silently():
    script = Script(refuse_fields=("top_k", "repetition_penalty"))
    fake, url = _fake(script)
    with fake:
        remote = connect_remote(RemoteSettings(url=url, wait=5))
        assert remote.supported == frozenset({"ignore_eos"})
        assert remote.max_model_len == 2048 and remote.model_name == "fake-model"  # from the listing's context_length
        assert remote.counts_tokens is False  # no /tokenize: history fitting estimates
        chat = ChatService(remote, None)
        try:
            for live in serve(chat, None, knowledge=_no_knowledge()):
                reply = requests.post(live.url + "/run", json={"question": "hi", "top_k": 5, "temperature": 0.7},
                                      timeout=60).json()
                assert reply["answer"] == "Hello from the fake engine."
                generation = next(s for s in reply["trace"]["spans"] if s["name"] == "generation")
                assert generation["attributes"]["ignored_params"] == ["top_k"]
                health = requests.get(live.url + "/health").json()["engine"]
                assert health["unsupported_params"] == ["repetition_penalty", "top_k"]
                assert health["ignored_params"] >= 1
        finally:
            chat.shutdown()
            remote.shutdown()
    assert "top_k" not in script.bodies[-1]


def test_connections_to_the_engine_are_reused():
    """An answer's body is read to its end after [DONE], so its connection goes back to the pool (closing it
    with bytes unread made every request open a new connection to the engine)."""
    script = Script()
    fake, url = _fake(script)
    with fake:
        remote = connect_remote(RemoteSettings(url=url, wait=5))
        chat = ChatService(remote, None)
        try:
            for live in serve(chat, None, knowledge=_no_knowledge()):
                for _ in range(10):
                    reply = requests.post(live.url + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "hi"}], "stream": True}, timeout=60)
                    assert "Hello" in reply.text and reply.text.rstrip().endswith("[DONE]")
                time.sleep(0.2)
                assert len(script.client_ports) == 10 and len(set(script.client_ports)) <= 2, script.client_ports
        finally:
            chat.shutdown()
            remote.shutdown()


def test_retries_happen_only_before_the_first_token():
    script = Script(fail_first=2)
    fake, url = _fake(script)
    with fake:
        remote = connect_remote(RemoteSettings(url=url, wait=5, retries=2))
        chat = ChatService(remote, None)
        try:
            for live in serve(chat, None, knowledge=_no_knowledge()):
                reply = requests.post(live.url, json={"prompt": "hi"}, timeout=60)
                assert reply.status_code == 200 and reply.json()["response"] == "Hello from the fake engine."
                assert script.chat_calls == 3  # two 503s retried
                script.chat_calls, script.fail_first = 0, 5
                failed = requests.post(live.url, json={"prompt": "hi"}, timeout=60)
                assert failed.status_code == 503 and failed.json()["error"]["code"] == "engine_unavailable"
                assert "warming up" in failed.json()["error"]["message"] and script.chat_calls == 3
                script.chat_calls, script.fail_first, script.drop_after_first_token = 0, 0, True
                broken = requests.post(live.url + "/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "stream": True}, timeout=60)
                assert "Hello" in broken.text and "error" in broken.text  # the client saw the failure mid-stream
                assert script.chat_calls == 1  # never retried after a token was sent
        finally:
            chat.shutdown()
            remote.shutdown()


def test_unreachable_engine_fails_start_and_requests_clearly(knowledge):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ModelLoadError, match="127.0.0.1.*not ready after .*cannot be reached"):
        connect_remote(RemoteSettings(url=dead, wait=1))
    # an engine that goes away after start: 503 with the reason, and not ready
    remote = RemoteEngine(RemoteSettings(url=dead, retries=1), ServerFacts("gone-model", 4096, "vllm"),
                          frozenset(), counts_tokens=False)
    chat = ChatService(remote, knowledge)
    try:
        for live in serve(chat, None, knowledge=knowledge):
            reply = requests.post(live.url, json={"prompt": "hi"}, timeout=30)
            assert reply.status_code == 503 and reply.headers["Retry-After"]
            assert "cannot be reached" in reply.json()["error"]["message"]
            stream = requests.post(live.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "stream": True}, timeout=30)
            assert stream.status_code == 503 and stream.json()["error"]["code"] == "engine_unavailable"
            assert requests.get(live.url + "/health/ready").status_code == 503
            health = requests.get(live.url + "/health").json()
            assert health["ready"] is False and health["status"] == "unavailable"
            assert requests.get(live.url + "/health/live").status_code == 200
            metrics = requests.get(live.url + "/metrics").text
            assert f'chatllm_engine_up{{engine_url="{dead}"}} 0.0' in metrics
            failed = [line for line in metrics.splitlines() if line.startswith("chatllm_engine_errors_total") and 'kind="failed"' in line]
            assert failed and float(failed[0].split()[-1]) >= 2
    finally:
        chat.shutdown()
        remote.shutdown()


def _no_knowledge():
    """A knowledge service is part of every app; these upstream tests do not use it."""
    import tempfile

    from knowledge.config import KnowledgeConfig
    from knowledge.service import KnowledgeService

    class _NoEmbedder:
        name, dimension = "none", 1

    return KnowledgeService(KnowledgeConfig(knowledge_dir=tempfile.mkdtemp()), _NoEmbedder())
