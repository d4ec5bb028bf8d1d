"""Every kind of bad request gets the right 4xx and a JSON error naming the field."""

import pytest
import requests

CASES = [
    # (body, content type, status, param, words in the message)
    ('{"prompt": ', "application/json", 400, "body", "malformed JSON"),
    ("[1, 2]", "application/json", 400, "body", "must be an object, not an array"),
    ('"just a string"', "application/json", 400, "body", "not a string"),
    ('{"prompt": "hi", "max_new_tokens": "lots"}', "application/json", 400, "max_new_tokens", "valid integer"),
    ('{"prompt": "hi", "max_new_tokens": 0}', "application/json", 400, "max_new_tokens", "greater than or equal to 1"),
    ('{"prompt": "hi", "max_new_tokens": -5}', "application/json", 400, "max_new_tokens", "greater than or equal to 1"),
    ('{"prompt": "hi", "top_p": 1.5}', "application/json", 400, "top_p", "less than or equal to 1"),
    ('{"prompt": "hi", "top_p": 0}', "application/json", 400, "top_p", "greater than 0"),
    ('{"prompt": "hi", "temperature": -0.1}', "application/json", 400, "temperature", "greater than or equal to 0"),
    ('{"prompt": "hi", "temperature": NaN}', "application/json", 400, "temperature", "finite"),
    ('{"prompt": "hi", "top_k": -1}', "application/json", 400, "top_k", "greater than or equal to 0"),
    ('{"prompt": "hi", "repetition_penalty": 0}', "application/json", 400, "repetition_penalty", "greater than or equal to 0.01"),
    # out-of-range numbers that used to reach the sampler and fail every user's batch
    ('{"prompt": "hi", "top_k": 1e20}', "application/json", 400, "top_k", "integer"),
    ('{"prompt": "hi", "top_k": 100000000000000000000}', "application/json", 400, "top_k", "less than or equal to 1000000"),
    ('{"prompt": "hi", "repetition_penalty": 1e-300}', "application/json", 400, "repetition_penalty", "greater than or equal to 0.01"),
    ('{"prompt": "hi", "temperature": 1e300}', "application/json", 400, "temperature", "less than or equal to 100"),
    ('{"prompt": "hi", "temperature": 1e999}', "application/json", 400, "temperature", "finite"),
    ('{"prompt": "hi", "max_new_tokens": 99999999999}', "application/json", 400, "max_new_tokens", "less than or equal to"),
    ('{"prompt": "hi", "seed": 18446744073709551616}', "application/json", 400, "seed", "less than or equal to"),
    ('{"prompt": "hi", "seed": -1}', "application/json", 400, "seed", "greater than or equal to 0"),
    ('{"prompt": "hi", "top_k": ' + "9" * 5000 + "}", "application/json", 400, "body", "at most 40"),
    ('{"prompt": "hi", "history": ' + "[" * 5000 + "]" * 5000 + "}", "application/json", 400, "body", "nested more than"),
    ('{"prompt": "hi", "x": ' + "[" * 40 + "]" * 40 + "}", "text/plain", 400, "body", "nested more than"),
    ('{"prompt": "hi", "history": [["only one"]]}', "application/json", 400, "history", "pair"),
    ('{"prompt": "hi", "history": "nope"}', "application/json", 400, "history", "list"),
    ('{"prompt": "hi", "history": [["a", 5]]}', "application/json", 400, "history", "two strings"),
    ('{"prompt": 42}', "application/json", 400, "prompt", "valid string"),
    ('{"prompt": "hi", "use_stream_chat": "maybe"}', "application/json", 400, "use_stream_chat", "boolean"),
    ('{"max_new_tokens": 5}', "application/json", 400, "prompt", "must not be empty"),
    ("", "text/plain", 400, "prompt", "empty request body"),
    ("   ", "application/json", 400, "prompt", "empty request body"),
]


@pytest.mark.parametrize("body,ctype,status,param,words", CASES, ids=[c[3] + ":" + c[0][:24] for c in CASES])
def test_bad_request_is_rejected_with_named_field(server, body, ctype, status, param, words):
    response = requests.post(server.url, data=body.encode(), headers={"Content-Type": ctype}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"


def test_prompt_longer_than_context(server):
    response = requests.post(server.url, json={"prompt": "word " * 9000}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert "8192" in error["message"]


def test_prompt_longer_than_context_when_streaming_is_still_a_400(server):
    response = requests.post(server.url, json={"prompt": "word " * 9000, "use_stream_chat": True}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_ten_megabyte_body_is_refused(server):
    response = requests.post(server.url, data=b"a" * (10 * 1024 * 1024), timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "body"


def test_ten_megabyte_chunked_body_without_length_is_refused(server):
    def chunks():
        for _ in range(10):
            yield b"a" * (1024 * 1024)

    response = requests.post(server.url, data=chunks(), timeout=60)
    assert response.status_code == 413


def test_invalid_utf8_body(server):
    response = requests.post(server.url, data=b"\xff\xfe\xfa bad", timeout=30)
    assert response.status_code == 400 and "UTF-8" in response.json()["error"]["message"]


def test_long_history_is_trimmed_to_fit_instead_of_failing(short_context_server):
    history = [["tell me about history " * 30, "ok " * 60]] * 12  # ~2300 tokens for a 1024-token context
    response = requests.post(short_context_server.url, json={"prompt": "Hi", "history": history, "max_new_tokens": 4},
                             timeout=120)
    assert response.status_code == 200
    body = response.json()
    # as many of the newest turns as fit (one turn is ~190 tokens), with room for the 4-token answer
    assert 1024 - 4 - 200 < body["usage"]["prompt_tokens"] <= 1024 - 4
    assert len(body["history"]) == 13  # the reply still returns the whole conversation


def test_server_keeps_answering_after_bad_input(server):
    for body, ctype, *_ in CASES:
        requests.post(server.url, data=body.encode(), headers={"Content-Type": ctype}, timeout=30)
    response = requests.post(server.url, json={"prompt": "What is the capital of France?", "do_sample": False, "max_new_tokens": 20}, timeout=120)
    assert response.status_code == 200 and "Paris" in response.json()["response"]
