"""The model's own sampling defaults fill the fields a request leaves out; sent fields are used exactly."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time

import gguf
import httpx
import pytest

from api.openai_schemas import ChatCompletionRequest
from api.schemas import EASChatRequest
from engine import ModelLoadError
from engine.generation_defaults import GenerationDefaults, load_generation_defaults

FRANCE = "What is the capital of France?"
# a small fixed set with one unambiguous answer each; none of them was used to choose the defaults
QUESTIONS = [
    ("What is the capital of Japan?", ("tokyo",)),
    ("How many days are in a week?", ("7", "seven")),
    ("What is 2 + 2?", ("4", "four")),
    ("What is the capital of the United Kingdom?", ("london",)),
    ("What is the chemical symbol for water?", ("h2o", "h₂o")),
]


def _write_config(folder, **values):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "do_sample": True, **values}))
    return folder


def test_generation_config_json_is_read_and_bad_values_ignored(tmp_path):
    folder = _write_config(tmp_path / "model", temperature=0.6, top_p=0.95, top_k=20, repetition_penalty=1.05,
                           max_new_tokens=300)
    found = load_generation_defaults("auto", str(folder), None, "some-model")
    assert found.values() == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 300}
    assert str(folder) in found.source

    broken = _write_config(tmp_path / "broken", temperature="hot", top_p=7, top_k=2.5, max_new_tokens=0, repetition_penalty=1.2)
    assert load_generation_defaults("auto", str(broken), None, "x").values() == {"repetition_penalty": 1.2}


def test_setting_none_a_directory_and_a_missing_one(tmp_path):
    folder = _write_config(tmp_path / "model", temperature=0.6)
    assert load_generation_defaults("none", str(folder), None, "SmolLM2-135M-Instruct").values() == {}
    elsewhere = _write_config(tmp_path / "elsewhere", temperature=0.3)
    assert load_generation_defaults(str(elsewhere), str(folder), None, "x").temperature == 0.3
    with pytest.raises(ModelLoadError, match="no generation_config.json"):
        load_generation_defaults(str(tmp_path / "nothing"), str(folder), None, "x")


def test_gguf_metadata_then_the_table_for_the_embedded_model(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_float32("general.sampling.temp", 0.7)
    writer.add_uint32("general.sampling.top_k", 40)
    writer.add_float32("general.sampling.top_p", 0.8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    found = load_generation_defaults("auto", str(tmp_path), "m.gguf", "m")
    assert found.top_k == 40 and abs(found.temperature - 0.7) < 1e-6 and abs(found.top_p - 0.8) < 1e-6

    # the embedded GGUF carries no sampling metadata: the table applies
    table = load_generation_defaults("auto", None, None, "SmolLM2-135M-Instruct")
    assert table.values() == {"temperature": 0.2, "top_p": 0.5} and "recommended" in table.source
    assert load_generation_defaults("auto", None, None, "unknown-model").values() == {}


def test_left_out_fields_take_the_model_defaults_and_sent_fields_are_exact():
    model = GenerationDefaults(temperature=0.2, top_p=0.5, top_k=20, max_new_tokens=300)
    params = EASChatRequest(prompt="hi").sampling_params(model)
    assert (params.temperature, params.top_p, params.top_k, params.max_new_tokens) == (0.2, 0.5, 20, 300)
    assert params.repetition_penalty == 1.0  # the model says nothing: the protocol default
    # the protocol's own default values, sent explicitly, are honoured, not replaced
    sent = EASChatRequest.model_validate({"prompt": "hi", "temperature": 0.95, "top_p": 0.8, "top_k": 30,
                                          "max_new_tokens": 2048}).sampling_params(model)
    assert (sent.temperature, sent.top_p, sent.top_k, sent.max_new_tokens) == (0.95, 0.8, 30, 2048)

    openai = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    chat = openai.to_chat_request(default_max_tokens=1000, defaults=model)
    assert (chat.params.temperature, chat.params.top_p, chat.params.top_k) == (0.2, 0.5, 20) and chat.params.do_sample
    explicit = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "temperature": 1.0, "top_p": 1.0})
    params = explicit.to_chat_request(default_max_tokens=1000, defaults=model).params
    assert (params.temperature, params.top_p) == (1.0, 1.0)


def test_health_and_a_bare_request_use_the_embedded_defaults(client, chat_service):
    engine = client.get("/health").json()["engine"]
    assert engine["generation_defaults"] == {"source": "recommended settings for SmolLM2-135M-Instruct", "temperature": 0.2, "top_p": 0.5}
    # a bare request and one spelling out the defaults draw the same tokens from the same seed; the three are
    # sent together (one batch, each row with its own seeded generator). The prompt asks for a short story:
    # an open-ended one runs to the 512-token default, 20 s here, and shows nothing more
    prompt = "Tell me a very short story about a cat, in two sentences."
    bodies = [{"prompt": prompt, "seed": 11},
              {"prompt": prompt, "seed": 11, "temperature": 0.2, "top_p": 0.5, "top_k": 30,
               "max_new_tokens": chat_service.limits.default_max_new_tokens},
              {"prompt": prompt, "seed": 11, "temperature": 1.5, "top_p": 1.0, "top_k": 0, "max_new_tokens": 40}]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bare, spelled, hot = pool.map(lambda body: client.post("/", json=body).json()["response"], bodies)
    assert len(bare) > 40 and bare == spelled and bare != hot


async def _ask(client: httpx.AsyncClient, surface: str, question: str) -> tuple[str, float]:
    started = time.monotonic()
    if surface == "eas":
        reply = (await client.post("/", json={"prompt": question})).json()["response"]
    else:
        body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": question}]}
        reply = (await client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
    return reply, time.monotonic() - started


@pytest.mark.parametrize("surface", ["eas", "openai"])
def test_default_answers_are_right_and_prompt(server, surface):
    """Sampled with the defaults, not greedy: Paris at least 9 times in 10, the small set at 80%, each within 30 s."""

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            france = await asyncio.gather(*[_ask(client, surface, FRANCE) for _ in range(10)])
            others = await asyncio.gather(*[_ask(client, surface, q) for q, _ in QUESTIONS for _ in range(3)])
        return france, others

    france, others = asyncio.run(run())
    paris = sum("paris" in text.lower() for text, _ in france)
    assert paris >= 9, [text for text, _ in france]
    expected = [answers for _, answers in QUESTIONS for _ in range(3)]
    right = sum(any(a in text.lower() for a in answers) for (text, _), answers in zip(others, expected))
    assert right >= 0.8 * len(others), [text for text, _ in others]
    assert max(seconds for _, seconds in france + others) < 30
