"""`/metrics`: vLLM's engine metric names (so its Grafana dashboard works), chatllm_ metrics, and who may read them."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKEN, serve
from tests.history_fixtures import serve_with_history

MODEL = {"model_name": "SmolLM2-135M-Instruct", "engine": "0"}


def scrape(url: str, headers=None) -> dict[tuple, float]:
    """Every sample as {(name, sorted labels): value}."""
    response = requests.get(url + "/metrics", headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_request_moves_vllms_counters_and_histograms_by_what_it_did(server):
    before = scrape(server.url)
    reply = requests.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 12, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}}, timeout=120)
    assert reply.status_code == 200
    after = scrape(server.url)
    usage = [line for line in reply.text.splitlines() if '"usage": {' in line][-1]
    prompt_tokens = int(usage.split('"prompt_tokens": ')[1].split(",")[0])

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:prompt_tokens_total", **MODEL) == prompt_tokens
    assert delta("vllm:generation_tokens_total", **MODEL) == 12
    assert delta("vllm:request_success_total", **MODEL, finished_reason="length") == 1
    assert delta("vllm:time_to_first_token_seconds_count", **MODEL) == 1
    assert delta("vllm:e2e_request_latency_seconds_count", **MODEL) == 1
    assert delta("vllm:request_queue_time_seconds_count", **MODEL) == 1
    assert 8 <= delta("vllm:inter_token_latency_seconds_count", **MODEL) <= 11  # one gap between each streamed piece
    assert delta("vllm:request_generation_tokens_sum", **MODEL) == 12
    assert delta("vllm:prefix_cache_queries_total", **MODEL) == prompt_tokens
    assert delta("chatllm_http_requests_total", method="POST", route="/v1/chat/completions", status="200") == 1
    assert delta("chatllm_http_request_duration_seconds_count", method="POST", route="/v1/chat/completions") == 1


def test_engine_gauges_show_a_running_request(server):
    done = threading.Event()

    def long_answer():
        with httpx.Client(timeout=120) as client:
            client.post(server.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 120, "ignore_eos": True})
        done.set()

    threading.Thread(target=long_answer, daemon=True).start()
    seen_running, seen_usage = 0.0, 0.0
    deadline = time.monotonic() + 60
    while not done.is_set() and time.monotonic() < deadline:
        samples = scrape(server.url)
        seen_running = max(seen_running, value(samples, "vllm:num_requests_running", **MODEL))
        seen_usage = max(seen_usage, value(samples, "vllm:kv_cache_usage_perc", **MODEL))
        assert ("vllm:num_requests_waiting", tuple(sorted(MODEL.items()))) in samples
        time.sleep(0.1)
    assert seen_running >= 1 and 0 < seen_usage < 1
    assert done.wait(60)
    assert value(scrape(server.url), "vllm:num_requests_running", **MODEL) == 0


def test_routes_are_labelled_by_template_not_raw_path(server):
    before = scrape(server.url)
    requests.get(server.url + "/v1/no-such-thing-" + "x" * 50)
    requests.get(server.url + "/api/knowledge/bases/does-not-exist")
    after = scrape(server.url)
    labels = {dict(k[1]).get("route") for k in after if k[0] == "chatllm_http_requests_total"}
    assert not any("x" * 50 in (r or "") or "does-not-exist" in (r or "") for r in labels)
    assert value(after, "chatllm_http_requests_total", method="GET", route="/v1/{rest:path}", status="404") \
        - value(before, "chatllm_http_requests_total", method="GET", route="/v1/{rest:path}", status="404") == 1


def test_retrieval_and_ingestion_metrics(server):
    before = scrape(server.url)
    job = requests.post(server.url + "/api/knowledge/metrics-kb/files?wait=true", files=[(
        "files", ("lighthouse.txt", b"The Vardo lighthouse keeper logs the fog horn hours in a red ledger."))],
        timeout=300).json()
    assert job["state"] == "done"
    requests.post(server.url, json={"prompt": "Where does the Vardo keeper log fog horn hours?", "langchain": True,
                                    "kb": "metrics-kb", "max_new_tokens": 8}, timeout=120).raise_for_status()
    after = scrape(server.url)
    assert value(after, "chatllm_ingest_files_total", status="added") - value(before, "chatllm_ingest_files_total",
                                                                            status="added") == 1
    assert value(after, "chatllm_ingest_chunks_total") - value(before, "chatllm_ingest_chunks_total") >= 1
    assert value(after, "chatllm_ingest_jobs_total", state="done") - value(before, "chatllm_ingest_jobs_total",
                                                                          state="done") == 1
    assert value(after, "chatllm_retrievals_total", matched="true") - value(before, "chatllm_retrievals_total",
                                                                           matched="true") == 1
    assert value(after, "chatllm_retrieval_duration_seconds_count") - value(before,
                                                                            "chatllm_retrieval_duration_seconds_count") == 1


def test_history_writes_are_counted(engine, knowledge, tmp_path):
    for live, _ in serve_with_history(engine, knowledge, f"sqlite:///{tmp_path / 'h.db'}"):
        requests.post(live.url, json={"prompt": "Hello", "max_new_tokens": 4}, timeout=120).raise_for_status()
        samples = scrape(live.url)
        assert value(samples, "chatllm_history_writes_total", outcome="ok") == 1
        assert value(samples, "chatllm_history_write_seconds_total") > 0


def test_metrics_need_the_token_unless_public(secured_server, chat_service):
    assert requests.get(secured_server.url + "/metrics").status_code == 401
    assert requests.get(secured_server.url + "/metrics", headers={"Accept": "text/html"}).status_code == 401
    assert "vllm:num_requests_running" in requests.get(secured_server.url + "/metrics",
                                                        headers=secured_server.headers()).text
    for probe in ("/health/live", "/health/ready"):
        open_probe = requests.get(secured_server.url + probe)
        assert open_probe.status_code == 200 and set(open_probe.json()) <= {"status", "ready"}
    for live in serve(chat_service, TOKEN, metrics_public=True):
        assert requests.get(live.url + "/metrics").status_code == 200
        assert requests.post(live.url, json={"prompt": "hi"}).status_code == 401  # only /metrics opened


@pytest.mark.parametrize("path", ["/metrics"])
def test_metrics_are_in_the_openapi_description(server, path):
    assert path in requests.get(server.url + "/openapi.json").json()["paths"]
