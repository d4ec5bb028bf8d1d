"""Long prompts are read in chunks between decode steps: running streams keep flowing, answers do not change."""

import asyncio
import dataclasses
import uuid

import pytest

from engine import ChatMessage, SamplingParams
from engine.prefix_cache import PrefixCache

GREEDY = SamplingParams(max_new_tokens=12, do_sample=False)
# about 2,600 prompt tokens: forty chunks at the default budget of 64
LONG_TEXT = "Here is a list of items to remember: " + " ".join(f"item{k} is {k * 7 % 13}" for k in range(420)) + ". Which item comes first?"


@pytest.fixture
def limits(engine):
    saved = engine.limits

    def use(**changes):
        engine.limits = dataclasses.replace(saved, **changes)

    yield use
    engine.limits = saved


async def _collect(engine, messages, params):
    text, finish = "", None
    async for chunk in engine.generate(messages, params, uuid.uuid4().hex):
        text += chunk.delta
        finish = chunk.finish_reason or finish
    return text, finish


def _long_messages(tag: str):
    # a different start each time: a prompt read before would come whole from the prefix cache
    return [ChatMessage("user", f"({tag}) {LONG_TEXT}")]


def test_long_prompt_answer_is_the_same_read_whole_or_in_chunks(engine, limits, monkeypatch):
    assert engine.count_prompt_tokens(_long_messages("same")) > 2000
    # as with --prefix-cache-tokens 0: the second read must not come from the first one's KV
    monkeypatch.setattr(engine._scheduler, "prefixes", PrefixCache(0))
    limits(max_prefill_tokens=100_000)
    whole = asyncio.run(_collect(engine, _long_messages("same"), GREEDY))
    limits(max_prefill_tokens=200)
    chunked = asyncio.run(_collect(engine, _long_messages("same"), GREEDY))
    assert whole == chunked and whole[0]


def test_running_stream_keeps_going_while_a_long_prompt_is_read(engine, limits):
    limits(max_prefill_tokens=128)  # ~20 chunks

    async def scenario():
        events = []

        async def short():
            params = SamplingParams(max_new_tokens=60, do_sample=False, ignore_eos=True)
            async for chunk in engine.generate([ChatMessage("user", "Count from one to fifty.")], params, uuid.uuid4().hex):
                events.append(("short", chunk.usage.completion_tokens))

        async def long():
            await asyncio.sleep(0.3)  # the short answer is streaming
            events.append(("long-sent", 0))
            async for chunk in engine.generate(_long_messages("overlap"), GREEDY, uuid.uuid4().hex):
                events.append(("long", chunk.usage.completion_tokens))

        await asyncio.gather(short(), long())
        return events

    events = asyncio.run(scenario())
    sent = events.index(("long-sent", 0))
    first_long = next(i for i, (who, _) in enumerate(events) if who == "long")
    between = [n for who, n in events[sent:first_long] if who == "short"]
    # read in one pass, the long prompt would stall the short stream until its first token
    assert len(between) >= 8, events


def test_short_requests_overtake_a_long_prompt_being_read(engine, limits):
    limits(max_prefill_tokens=128)

    async def scenario():
        order = []

        async def ask(name, messages, delay):
            await asyncio.sleep(delay)
            await _collect(engine, messages, GREEDY)
            order.append(name)

        await asyncio.gather(ask("long", _long_messages("overtake"), 0.0), ask("short", [ChatMessage("user", "Say hi.")], 0.3))
        return order

    assert asyncio.run(scenario()) == ["short", "long"]


def test_cancelling_during_a_chunked_read_frees_the_engine(engine, limits):
    limits(max_prefill_tokens=64)

    async def scenario():
        task = asyncio.create_task(_collect(engine, _long_messages("cancel"), GREEDY))
        await asyncio.sleep(0.5)
        busy = engine.health()["prefilling"]
        task.cancel()  # as when the client disconnects
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):
            if engine.health()["prefilling"] is None and engine.health()["waiting"] == 0:
                return busy, True
            await asyncio.sleep(0.05)
        return busy, False

    busy, freed = asyncio.run(scenario())
    assert busy is not None and 0 < busy["done"] < busy["prompt_tokens"]
    assert freed


def test_a_long_row_decodes_in_its_own_batch(engine):
    """Merged into the short rows' batch, its width would pad every row to ~2,600 columns."""

    async def scenario():
        seen = []

        async def short(i):
            params = SamplingParams(max_new_tokens=120, do_sample=False, ignore_eos=True)
            await _collect(engine, [ChatMessage("user", f"({i}) Count to a hundred.")], params)

        async def long():
            await asyncio.sleep(0.3)
            params = SamplingParams(max_new_tokens=6, do_sample=False, ignore_eos=True)
            async for chunk in engine.generate(_long_messages("own batch"), params, uuid.uuid4().hex):
                seen.append(engine.health()["batches"])

        await asyncio.gather(short(1), short(2), long())
        return seen

    assert 2 in asyncio.run(scenario())
