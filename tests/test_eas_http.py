"""POST / with the documented client logic, plain-text bodies and the \\0 stream."""

import requests

from tests.eas_clients import get_response, get_streaming_response, post_http_request


def test_documented_non_stream_client_gets_answer_and_history(server):
    history = [["San Francisco is a", "city located in the state of California in the United States."]]
    response = post_http_request(
        server.url, "", "What is the capital of France?", system_prompt="", history=history,
        max_new_tokens=64, temperature=0.0,
    )
    assert response.status_code == 200
    output, new_history = get_response(response)
    assert "Paris" in output
    assert new_history == history + [["What is the capital of France?", output]]
    body = response.json()
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 20 and usage["completion_tokens"] >= 1
    assert body["finish_reason"] in ("stop", "length")


def test_plain_text_body_is_the_prompt(server):
    response = requests.post(server.url, data="What is the capital of France?".encode(), timeout=120)
    assert response.status_code == 200
    body = response.json()
    assert body["history"][0][0] == "What is the capital of France?"
    assert body["response"] == body["history"][0][1] and body["response"]


def test_json_labelled_as_form_is_still_a_request(server):
    response = requests.post(
        server.url,
        data='{"prompt": "Say hello", "max_new_tokens": 3}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=120,
    )
    body = response.json()
    assert body["history"][0][0] == "Say hello"
    assert body["usage"]["completion_tokens"] <= 3


def test_documented_stream_reader_sees_cumulative_answer(server):
    response = post_http_request(
        server.url, "", "List three fruits.", history=[], max_new_tokens=40, use_stream_chat=True
    )
    assert response.status_code == 200
    frames = list(get_streaming_response(response))
    assert len(frames) >= 3
    texts = [f["response"] for f in frames]
    for earlier, later in zip(texts, texts[1:]):
        assert later.startswith(earlier)  # each frame holds the whole answer so far
    assert all(f["history"][-1] == ["List three fruits.", f["response"]] for f in frames)
    assert "usage" not in frames[0] and "finish_reason" not in frames[0]
    last = frames[-1]
    assert last["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] <= 40
    assert last["usage"]["completion_tokens"] >= len(frames) - 1


def test_stream_flag_as_python_string(server):
    response = requests.post(
        server.url, json={"prompt": "Hi", "use_stream_chat": "True", "max_new_tokens": 8}, stream=True, timeout=120
    )
    raw = response.content
    assert raw.endswith(b"\0") and raw.count(b"\0") >= 2


def test_max_new_tokens_and_stop_are_honoured(server):
    capped = requests.post(server.url, json={"prompt": "Write a long story about a dragon.", "max_new_tokens": 5}, timeout=120).json()
    assert capped["usage"]["completion_tokens"] == 5 and capped["finish_reason"] == "length"

    greedy = {"prompt": "Count from 1 to 10, separated by commas.", "do_sample": False, "max_new_tokens": 60}
    full = requests.post(server.url, json=greedy, timeout=120).json()["response"]
    assert "4" in full, full
    stopped = requests.post(server.url, json={**greedy, "stop": ["4"]}, timeout=120).json()
    assert stopped["finish_reason"] == "stop"
    assert stopped["response"] == full[: full.index("4")]


def test_greedy_is_deterministic_and_seed_reproduces_sampling(server):
    greedy = {"prompt": "Name a planet.", "do_sample": False, "max_new_tokens": 20}
    a = requests.post(server.url, json=greedy, timeout=120).json()["response"]
    b = requests.post(server.url, json=greedy, timeout=120).json()["response"]
    assert a == b
    seeded = {"prompt": "Tell me a random word.", "temperature": 1.2, "top_k": 0, "top_p": 1.0, "seed": 1234, "max_new_tokens": 24}
    x = requests.post(server.url, json=seeded, timeout=120).json()["response"]
    y = requests.post(server.url, json=seeded, timeout=120).json()["response"]
    assert x == y


def test_system_prompt_and_history_reach_the_model(server):
    base = {"prompt": "Hi", "max_new_tokens": 1, "do_sample": False}
    plain = requests.post(server.url, json=base, timeout=120).json()["usage"]["prompt_tokens"]
    with_history = requests.post(
        server.url, json={**base, "system_prompt": "You are a pirate.", "history": [["Who are you?", "A pirate, arr."]]}, timeout=120
    ).json()["usage"]["prompt_tokens"]
    assert with_history > plain + 8


def test_health_reports_loaded_model(server):
    body = requests.get(server.url + "/health", timeout=10).json()
    assert body["status"] == "ok" and body["model_loaded"] is True
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["engine"]["max_model_len"] == 8192
