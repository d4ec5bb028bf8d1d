"""Prefix reuse: prompts that start like an earlier prompt or answer skip that part of the prefill."""

import asyncio

import pytest
import requests
import torch

from engine.config import EngineConfig
from engine.factory import build_engine
from engine.prefix_cache import PrefixCache
from engine.types import ChatMessage, SamplingParams


def _kv(n: int, fill: float) -> list:
    return [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), -fill)) for _ in range(3)]


def test_longest_common_start_is_reused_and_the_last_token_is_left_to_compute():
    cache = PrefixCache(max_tokens=100, min_match=2)
    cache.store(list(range(10)), lambda: _kv(10, 1.0))
    cache.store([0, 1, 2, 50, 51, 52, 53], lambda: _kv(7, 2.0))

    match = cache.lookup([0, 1, 2, 3, 4, 5, 99])
    assert match.tokens == 6 and match.kv[0][0].shape[2] == 6 and float(match.kv[0][0][0, 0, 0, 0]) == 1.0
    assert cache.lookup([0, 1, 2, 50, 51, 9]).tokens == 5
    assert cache.lookup(list(range(10))).tokens == 9  # the whole prompt is cached: its last token still runs
    assert cache.lookup([7, 8, 9]).tokens == 0


def test_budget_evicts_least_recently_used_and_covered_entries_are_not_duplicated():
    cache = PrefixCache(max_tokens=20, min_match=2)
    cache.store([1, 2, 3, 4, 5, 6, 7, 8], lambda: _kv(8, 1.0))
    def no_copy():
        raise AssertionError("a covered entry's KV was copied out of the batch")

    cache.store([1, 2, 3, 4], no_copy)  # already covered by the first entry: nothing is copied
    assert cache.stats()["entries"] == 1
    cache.store([9, 9, 9, 9, 9, 9, 9, 9], lambda: _kv(8, 2.0))
    cache.lookup([1, 2, 3, 4, 5, 0])  # the first entry is now the most recently used
    cache.store([5, 5, 5, 5, 5, 5, 5, 5], lambda: _kv(8, 3.0))
    assert cache.stats()["tokens"] <= 20
    assert cache.lookup([9, 9, 9, 9, 9, 0]).tokens == 0  # evicted
    assert cache.lookup([1, 2, 3, 4, 5, 0]).tokens == 5
    cache.store([1, 2, 3, 4, 5, 6, 7, 8, 10, 11], lambda: _kv(10, 4.0))  # extends the first entry: it replaces it
    assert cache.stats()["entries"] == 2 and cache.stats()["tokens"] == 18


@pytest.fixture(scope="module")
def cold_engine():
    """The same model with prefix reuse off: the reference every reused answer must equal."""
    built = build_engine(EngineConfig(prefix_cache_tokens=0))
    yield built
    built.shutdown()


def _answer(engine, messages, request_id):
    async def run():
        text = ""
        async for chunk in engine.generate(messages, SamplingParams(do_sample=False, max_new_tokens=24), request_id):
            text += chunk.delta
        return text

    return asyncio.run(run())


def _together(engine, conversations, prefix):
    async def run():
        async def one(i, messages):
            text = ""
            async for chunk in engine.generate(messages, SamplingParams(do_sample=False, max_new_tokens=24), f"{prefix}{i}"):
                text += chunk.delta
            return text

        return await asyncio.gather(*(one(i, m) for i, m in enumerate(conversations)))

    return asyncio.run(run())


def test_second_turn_prefills_only_what_is_new_and_answers_as_without_reuse(engine, cold_engine):
    system = ChatMessage("system", "You are a terse assistant for a ferry company in Norway.")
    first = [system, ChatMessage("user", "When does the first ferry leave?")]
    reply = _answer(engine, first, "turn-1")
    second = [*first, ChatMessage("assistant", reply), ChatMessage("user", "And the last one?")]

    before = engine.health()["prefill_tokens"]
    answer = _answer(engine, second, "turn-2")
    computed = engine.health()["prefill_tokens"] - before
    prompt_tokens = engine.count_prompt_tokens(second)
    assert computed < prompt_tokens / 2, f"prefilled {computed} of {prompt_tokens} prompt tokens"
    assert answer == _answer(cold_engine, second, "cold-turn-2")


def test_rows_with_and_without_a_reused_prefix_share_one_prefill(engine, cold_engine):
    """A fully cached prompt, one that shares only its system prompt, and a new one, admitted together."""
    cached = [ChatMessage("user", "Name three rivers in Europe.")]
    _answer(engine, cached, "warm-up")
    conversations = [
        cached,
        [ChatMessage("user", "Name three mountains in Asia.")],
        [ChatMessage("system", "Answer like a pirate, in one line."), ChatMessage("user", "Where is the treasure?")],
    ]
    assert _together(engine, conversations, "mixed-") == [_answer(cold_engine, m, f"cold-{i}") for i, m in enumerate(conversations)]


def test_health_reports_the_prefix_cache(server):
    requests.post(server.url, json={"prompt": "Hello there.", "max_new_tokens": 4}, timeout=60)
    stats = requests.get(server.url + "/health", timeout=10).json()["engine"]["prefix_cache"]
    assert stats["max_tokens"] == 4096 and stats["entries"] >= 1 and stats["hit_tokens"] > 0


def test_a_seeded_request_reads_its_whole_prompt_and_repeats_its_text(engine):
    """A prompt read partly from the cache changes the logits' last bits, which can change a seeded draw from a
    wide distribution: a seeded request never reuses a cached start, so its text repeats."""
    messages = [ChatMessage("user", "Tell me a random word, then a story about it.")]
    params = SamplingParams(temperature=1.2, top_k=0, top_p=1.0, seed=4321, max_new_tokens=24)

    async def run(request_id):
        text = ""
        async for chunk in engine.generate(messages, params, request_id):
            text += chunk.delta
        return text

    first = asyncio.run(run("seeded-1"))
    before = engine.health()["prefill_tokens"]
    second = asyncio.run(run("seeded-2"))
    assert engine.health()["prefill_tokens"] - before == engine.count_prompt_tokens(messages)  # none from the cache
    assert second == first
