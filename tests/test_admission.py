"""The bounded first-come queue in front of an engine with a fixed KV cache (llama.cpp)."""

from __future__ import annotations

import asyncio

import pytest

from engine.admission import TokenAdmission
from engine.llamacpp import SAMPLER_ORDER, llamacpp_sampling
from engine.types import EngineOverloadedError, SamplingParams


def test_requests_wait_in_arrival_order_for_slots_and_tokens():
    async def scenario():
        gate = TokenAdmission(capacity_tokens=100, max_running=2, max_waiting=5)
        order: list[str] = []
        await gate.acquire(60)
        await gate.acquire(30)

        async def later(name: str, tokens: int):
            await gate.acquire(tokens)
            order.append(name)

        big = asyncio.create_task(later("big", 70))
        await asyncio.sleep(0)
        small = asyncio.create_task(later("small", 5))  # would fit now, but arrived after "big"
        await asyncio.sleep(0.01)
        assert order == [] and gate.waiting == 2
        gate.release(30)  # 60 reserved: big (70) still does not fit, and small waits behind it
        await asyncio.sleep(0.01)
        assert order == []
        gate.release(60)
        await asyncio.wait_for(asyncio.gather(big, small), 1)
        assert order == ["big", "small"] and gate.running == 2 and gate.reserved_tokens == 75

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once_and_a_cancelled_waiter_leaves_no_trace():
    async def scenario():
        gate = TokenAdmission(capacity_tokens=10, max_running=1, max_waiting=1)
        await gate.acquire(10)
        waiter = asyncio.create_task(gate.acquire(5))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloadedError, match="at capacity"):
            await gate.acquire(1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert gate.waiting == 0
        gate.release(10)
        assert gate.running == 0 and gate.reserved_tokens == 0
        await asyncio.wait_for(gate.acquire(10), 1)  # the whole pool is free again

    asyncio.run(scenario())


def test_a_request_larger_than_the_pool_is_capped_to_it_rather_than_waiting_forever():
    async def scenario():
        gate = TokenAdmission(capacity_tokens=50, max_running=4, max_waiting=4)
        await asyncio.wait_for(gate.acquire(500), 1)
        assert gate.reserved_tokens == 50
        gate.release(500)
        assert gate.reserved_tokens == 0

    asyncio.run(scenario())


def test_sampling_fields_are_all_spelled_out_for_llamacpp():
    sampled = llamacpp_sampling(SamplingParams(temperature=0.7, top_k=0, top_p=0.9, repetition_penalty=1.2,
                                               presence_penalty=0.5, stop=("END",), seed=7, max_new_tokens=40),
                                template_stops=("<|im_end|>",), context=8192)
    # llama.cpp's own defaults (top_k 40, min_p 0.05, a 64-token penalty window) must never apply silently
    assert sampled["top_k"] == 0 and sampled["min_p"] == 0.0 and sampled["repeat_last_n"] == 8192
    assert sampled["repeat_penalty"] == 1.2 and sampled["presence_penalty"] == 0.5
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9 and sampled["seed"] == 7
    assert sampled["stop"] == ["END", "<|im_end|>"] and sampled["max_tokens"] == 40
    assert sampled["samplers"] == SAMPLER_ORDER and SAMPLER_ORDER.index("temperature") < SAMPLER_ORDER.index("top_p")
    greedy = llamacpp_sampling(SamplingParams(do_sample=False, temperature=0.9, top_k=30, top_p=0.5))
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == 0 and greedy["top_p"] == 1.0 and "seed" not in greedy
