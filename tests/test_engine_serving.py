"""The shared runner under load: several users at once, cancellation, a free event loop."""

import asyncio
import json
import time

import httpx
import pytest
import requests

LONG = {"prompt": "Write a very long essay about the history of the Roman empire.", "max_new_tokens": 400, "do_sample": False}


def _health(server) -> dict:
    return requests.get(server.url + "/health", timeout=10).json()["engine"]


async def _first_frame_then_hold(client: httpx.AsyncClient, url: str, body: dict, hold: float):
    async with client.stream("POST", url, json={**body, "use_stream_chat": True}) as response:
        async for _ in response.aiter_bytes():
            await asyncio.sleep(hold)
            return  # leaving the block closes the connection mid-answer


def _wait_idle(server, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _health(server)
        if state["running"] == 0 and state["waiting"] == 0:
            return state
        time.sleep(0.05)
    raise AssertionError(f"engine still busy: {state}")


def test_short_request_is_not_stuck_behind_a_long_one(server):
    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            # 150 tokens take ~6 s alone: long enough to still run when the short one is done
            long_task = asyncio.create_task(client.post(server.url, json={**LONG, "max_new_tokens": 150}))
            await asyncio.sleep(1.0)  # the long answer is under way
            started = time.monotonic()
            short = await client.post(server.url, json={"prompt": "Say yes.", "max_new_tokens": 5})
            short_took = time.monotonic() - started
            long_done = long_task.done()
            long_body = (await long_task).json()
            return short.json(), short_took, long_done, long_body

    short, took, long_done_first, long_body = asyncio.run(scenario())
    assert short["usage"]["completion_tokens"] <= 5
    assert not long_done_first, "the short request should finish while the long one still runs"
    assert long_body["usage"]["completion_tokens"] > 50
    assert took < 10


def test_stream_client_disconnect_stops_generation(server):
    before = _wait_idle(server)
    asyncio.run(_run_disconnect(server.url, LONG))
    state = _wait_idle(server, timeout=2.0)  # freed within a couple of steps, not 400 tokens later
    assert state["aborted"] == before["aborted"] + 1
    assert state["tokens_generated"] - before["tokens_generated"] < 100


async def _run_disconnect(url, body):
    async with httpx.AsyncClient(timeout=60) as client:
        await _first_frame_then_hold(client, url, body, hold=0.3)


def test_non_stream_client_disconnect_stops_generation(server):
    before = _wait_idle(server)

    async def leave_once_running():
        async with httpx.AsyncClient(timeout=300) as client:
            request = asyncio.create_task(client.post(server.url, json=LONG))
            deadline = time.monotonic() + 60
            while (await client.get(server.url + "/health")).json()["engine"]["running"] == 0:
                assert time.monotonic() < deadline and not request.done()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            request.cancel()  # the client goes away mid-answer
            with pytest.raises(asyncio.CancelledError):
                await request

    asyncio.run(leave_once_running())
    state = _wait_idle(server, timeout=3.0)
    assert state["aborted"] == before["aborted"] + 1
    assert state["tokens_generated"] - before["tokens_generated"] < 120


def test_websocket_close_stops_generation(server):
    import websockets

    before = _wait_idle(server)

    async def leave_early():
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps(LONG))
            await ws.recv()
            await ws.recv()

    asyncio.run(leave_early())
    state = _wait_idle(server, timeout=3.0)
    assert state["aborted"] == before["aborted"] + 1


def test_event_loop_stays_responsive_during_generation(server):
    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [asyncio.create_task(client.post(server.url, json={**LONG, "max_new_tokens": 60})) for _ in range(3)]
            await asyncio.sleep(0.5)
            worst = 0.0
            for _ in range(10):
                started = time.monotonic()
                r = await client.get(server.url + "/health")
                worst = max(worst, time.monotonic() - started)
                assert r.status_code == 200
                await asyncio.sleep(0.1)
            results = await asyncio.gather(*tasks)
            return worst, results

    worst, results = asyncio.run(scenario())
    assert worst < 0.5, f"/health took {worst:.2f}s while the model was busy"
    assert all(r.json()["usage"]["completion_tokens"] == 60 for r in results)


def test_concurrent_greedy_answers_match_solo_answers(server):
    prompts = ["What is the capital of France?", "Name a color.", "What is 2+2?"]
    body = lambda p: {"prompt": p, "do_sample": False, "max_new_tokens": 24}
    solo = [requests.post(server.url, json=body(p), timeout=120).json()["response"] for p in prompts]

    async def together():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(server.url, json=body(p)) for p in prompts))

    assert [r.json()["response"] for r in asyncio.run(together())] == solo


def test_concurrent_requests_share_decode_steps(server):
    """Eight streams at once are decoded together: far fewer forward passes than tokens."""
    before = _health(server)

    async def together():
        async with httpx.AsyncClient(timeout=300) as client:
            body = {"prompt": "Write about the sea.", "max_new_tokens": 30, "do_sample": True, "seed": 1}
            return await asyncio.gather(*(client.post(server.url, json={**body, "seed": i}) for i in range(8)))

    replies = asyncio.run(together())
    after = _health(server)
    tokens = after["tokens_generated"] - before["tokens_generated"]
    steps = after["steps"] - before["steps"]
    assert tokens == sum(r.json()["usage"]["completion_tokens"] for r in replies)
    assert steps < tokens / 3, f"{steps} steps for {tokens} tokens: requests were not batched"
    assert after["peak_batch"] >= 4


def test_mixed_sampling_settings_in_one_batch(server):
    """Greedy, seeded and stop-limited requests batched together each keep their own settings.

    The seeded request draws from the 50 likeliest tokens: with top_k 0 at this temperature a draw can
    land in the far tail, where the last-bit differences between one batch and another (products over
    different row counts) change which token is picked; that happened in 1 of 12 tries and once in CI
    (README, `seed`).
    """
    greedy = {"prompt": "What is the capital of France?", "do_sample": False, "max_new_tokens": 20}
    seeded = {"prompt": "Invent a word.", "temperature": 1.2, "top_k": 50, "top_p": 1.0, "seed": 99, "max_new_tokens": 16}
    short = {"prompt": "Write a long story.", "max_new_tokens": 3}
    solo_greedy = requests.post(server.url, json=greedy, timeout=120).json()["response"]
    solo_seeded = requests.post(server.url, json=seeded, timeout=120).json()["response"]

    async def together():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(server.url, json=b) for b in (greedy, seeded, short, greedy)))

    g1, s1, sh, g2 = [r.json() for r in asyncio.run(together())]
    assert g1["response"] == g2["response"] == solo_greedy
    assert s1["response"] == solo_seeded
    assert sh["usage"]["completion_tokens"] == 3 and sh["finish_reason"] == "length"


def test_queue_limit_gives_503(engine, chat_service):
    """Past --max-queue, requests are refused with 503 instead of piling up."""
    from engine.sequences import BatchLimits
    from tests.conftest import serve

    saved = engine.limits
    engine.limits = BatchLimits(max_num_seqs=1, kv_cache_tokens=saved.kv_cache_tokens, max_prefill_tokens=saved.max_prefill_tokens, max_queue=1)
    try:
        for live in serve(chat_service, None):
            async def crowd():
                async with httpx.AsyncClient(timeout=300) as client:
                    body = {"prompt": "Write a long story.", "max_new_tokens": 40}
                    return await asyncio.gather(*(client.post(live.url, json=body) for _ in range(6)))

            codes = [r.status_code for r in asyncio.run(crowd())]
            assert 200 in codes and 503 in codes, codes
            break
    finally:
        engine.limits = saved
