"""The front's own CPU per streamed request, in front of a scripted engine that answers at once.

    .venv/bin/python bench/front_cost.py                  # 640 requests in bursts of 32
    .venv/bin/python bench/front_cost.py --requests 320 --burst 8

Starts a scripted OpenAI-compatible engine (two tokens per answer, no model)
on core 0 and `webui_server.py --api-only --no-history --backend openai` in
front of it on core 1, drives streamed chat completions at it in bursts, and
reports the front process's CPU time (user + system, psutil) per request:
what a ChatLLM-WebUI instance costs in front of an inference engine, without
the engine's own work in the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
ENGINE_PORT, FRONT_PORT = 8031, 8032


def serve_scripted_engine() -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def chunk(delta: dict, finish=None, usage=None) -> str:
        body = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model", "max_model_len": 8192}]})

    async def chat(request):
        await request.json()

        async def events():
            yield chunk({"content": "Hello"})
            yield chunk({"content": " there"})
            yield chunk({}, "stop", {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=ENGINE_PORT, log_level="warning")


async def drive(requests: int, burst: int) -> float:
    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "scripted", "stream": True, "messages": [{"role": "user", "content": f"Hello {i}"}]}
        async with client.stream("POST", f"http://127.0.0.1:{FRONT_PORT}/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                pass

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=2 * burst)) as client:
        started = time.perf_counter()
        for first in range(0, requests, burst):
            await asyncio.gather(*(one(client, first + i) for i in range(min(burst, requests - first))))
        return time.perf_counter() - started


def _wait(url: str) -> None:
    for _ in range(120):
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--serve-scripted-engine", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_scripted_engine:
        return serve_scripted_engine()
    pin = ["taskset", "-c"] if os.cpu_count() and os.cpu_count() > 1 else None
    engine = subprocess.Popen([*(pin + ["0"] if pin else []), sys.executable, __file__, "--serve-scripted-engine"])
    front = subprocess.Popen([*(pin + ["1"] if pin else []), sys.executable, str(ROOT / "webui" / "webui_server.py"),
                              "--api-only", "--no-history", "--port", str(FRONT_PORT), "--backend", "openai",
                              "--engine-url", f"http://127.0.0.1:{ENGINE_PORT}/v1", "--engine-model", "scripted",
                              "--max-model-len", "8192"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(f"http://127.0.0.1:{ENGINE_PORT}/v1/models")
        _wait(f"http://127.0.0.1:{FRONT_PORT}/health/live")
        asyncio.run(drive(2 * args.burst, args.burst))  # warm-up: connections, first-call imports
        process = psutil.Process(front.pid)
        before = sum(process.cpu_times()[:2])
        seconds = asyncio.run(drive(args.requests, args.burst))
        used = sum(process.cpu_times()[:2]) - before
        print(f"{args.requests} streamed requests in bursts of {args.burst}: {seconds:.2f} s, "
              f"front CPU {used * 1000 / args.requests:.2f} ms per request")
    finally:
        front.terminate()
        engine.terminate()
        front.wait(10)
        engine.wait(10)


if __name__ == "__main__":
    main()
