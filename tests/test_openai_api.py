"""The OpenAI-compatible API with the official SDK, raw SSE, and LangChain's ChatOpenAI."""

import json
import time

import httpx
import openai
import pytest
import requests
from langchain_openai import ChatOpenAI

from tests.conftest import TOKEN

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(secured_server) -> openai.OpenAI:
    return openai.OpenAI(api_key=TOKEN, base_url=secured_server.url + "/v1", max_retries=0, timeout=300)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_chat_non_stream_with_content_parts(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful AI assistant."}]},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]},
        ],
        max_completion_tokens=40, temperature=0,
    )
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 15 and reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == MODEL and reply.id.startswith("chatcmpl-")


def test_chat_stream_role_first_done_last_and_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "List three colors."}], max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 20
    assert all(c.usage is None for c in chunks[:-1])


def test_length_finish_reason_and_max_tokens(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Write a long story."}], max_tokens=5)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5


def test_stop_sequences(client):
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0).choices[0].message.content
    assert "4" in full
    cut = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=60, temperature=0, stop=["4", "zzz"]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index("4")]


def test_seed_reproduces_and_n_gives_several_choices(client):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Invent a name for a cat."}], max_tokens=16, temperature=1.3, top_p=1.0)
    a = client.chat.completions.create(seed=42, **args).choices[0].message.content
    b = client.chat.completions.create(seed=42, **args).choices[0].message.content
    assert a == b
    many = client.chat.completions.create(seed=42, n=3, **args)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a
    assert len({c.message.content for c in many.choices}) > 1
    single = client.chat.completions.create(seed=42, **args).usage
    assert many.usage.prompt_tokens == single.prompt_tokens
    assert many.usage.completion_tokens > single.completion_tokens  # the three answers are counted together


def test_penalties_are_applied(client):
    # a conversation the small model answers greedily with a loop ("la femme de France, la femme de ...")
    messages = [{"role": "system", "content": "You are a helpful and harmless assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
    args = dict(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    plain = client.chat.completions.create(**args).choices[0].message.content
    penalised = client.chat.completions.create(frequency_penalty=2.0, presence_penalty=1.0, **args).choices[0].message.content
    most_repeated = lambda text: max(text.lower().split().count(w) for w in set(text.lower().split()))  # noqa: E731
    assert most_repeated(plain) >= 4, plain
    assert most_repeated(penalised) < most_repeated(plain), penalised


def test_langchain_chat_openai(secured_server):
    llm = ChatOpenAI(model=MODEL, api_key=TOKEN, base_url=secured_server.url + "/v1", temperature=0, max_tokens=30, max_retries=0)
    assert "Paris" in llm.invoke("What is the capital of France?").content


def test_completions_stream_string_true_in_bladellm_shape(secured_server):
    """The documented curl call: "stream": "true", read line by line."""
    response = requests.post(
        secured_server.url + "/v1/completions",
        headers={"Content-Type": "application/json", "Authorization": TOKEN},
        data=json.dumps({"prompt": "The capital of Canada is", "stream": "true", "max_tokens": 12, "temperature": 0}),
        stream=True, timeout=300,
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    for i, c in enumerate(chunks):
        assert set(c) == {"id", "choices", "object", "usage", "error_info"}
        assert c["object"] == "text_completion" and c["error_info"] is None
        assert set(c["choices"][0]) == {"finish_reason", "index", "logprobs", "text"}
        assert c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
    assert all(c["choices"][0]["finish_reason"] == "" for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] <= 12
    assert "Ottawa" in "".join(c["choices"][0]["text"] for c in chunks)


def test_completions_sdk_list_of_prompts(client):
    reply = client.completions.create(model=MODEL, prompt=["The capital of Canada is", "The capital of France is"], max_tokens=8, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert "Ottawa" in reply.choices[0].text and "Paris" in reply.choices[1].text


def test_authentication_error(secured_server):
    bad = openai.OpenAI(api_key="wrong", base_url=secured_server.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.models.list()
    assert info.value.status_code == 401


@pytest.mark.parametrize(
    "body,status,param,words",
    [
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "does not exist"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages", "messages[0].content[0]: part type 'image_url'"),
        ({"messages": []}, 400, "messages", "at least 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "n", "less than or equal to 8"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature", "less than or equal to 2"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs", "not supported"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "messages", "last message"),
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "prompt", "context is 8192 tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}, 400, "prompt", "maximum context length is 8192"),
    ],
)
def test_chat_errors_in_openai_shape(secured_server, body, status, param, words):
    response = requests.post(secured_server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"]


def test_context_overflow_message_has_token_counts(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=8190)
    message = info.value.body["message"]
    assert "8192" in message and "8190 for the completion" in message
    assert info.value.body["code"] == "context_length_exceeded"


def test_stream_disconnect_cancels_generation(secured_server):
    health = lambda: requests.get(secured_server.url + "/health", headers=secured_server.headers(),  # noqa: E731
                                  timeout=10).json()["engine"]
    before = health()
    with httpx.stream("POST", secured_server.url + "/v1/chat/completions", headers={"Authorization": TOKEN}, timeout=60,
                      json={"messages": [{"role": "user", "content": "Write a very long essay about oceans."}], "max_tokens": 500, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    deadline = time.monotonic() + 3
    while health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = health()
    assert after["running"] == 0 and after["aborted"] == before["aborted"] + 1
    assert after["tokens_generated"] - before["tokens_generated"] < 60


def test_grounded_chat_completion_carries_sources(secured_server):
    headers = {"Authorization": TOKEN}
    requests.post(secured_server.url + "/api/knowledge/oai/files?wait=true", headers=headers, timeout=300,
                  files=[("files", ("zoo.md", b"# Zoo\nThe city zoo keeps three okapis named Ada, Bo and Cy."))])
    body = {"messages": [{"role": "user", "content": "How many okapis does the city zoo keep?"}], "langchain": True, "kb": "oai", "max_tokens": 20}
    reply = requests.post(secured_server.url + "/v1/chat/completions", json=body, headers=headers, timeout=300).json()
    assert reply["sources"][0]["file"] == "zoo.md"
    stream = requests.post(secured_server.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers, stream=True, timeout=300)
    events = [json.loads(line[6:]) for line in stream.iter_lines(decode_unicode=True) if line.startswith("data: {")]
    final = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert final and final[0]["sources"][0]["file"] == "zoo.md"


def test_openapi_describes_the_routes(secured_server):
    spec = requests.get(secured_server.url + "/openapi.json", timeout=10).json()
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/api/knowledge/{kb}/search"):
        assert path in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    assert "prompt" in schemas["CompletionRequest"]["properties"]
