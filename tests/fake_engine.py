"""A scripted OpenAI-compatible upstream for the failure paths a real engine rarely shows on demand.

It stands in for an external server (vLLM, Ollama), not for our code: it
refuses fields as strict servers do, fails the first attempts with 503, or
drops the connection after the first token.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class Script:
    refuse_fields: tuple[str, ...] = ()  # a 400 naming the first of these a request carries
    fail_first: int = 0  # this many chat requests get 503 first
    drop_after_first_token: bool = False
    words: tuple[str, ...] = ("Hello", " from", " the", " fake", " engine", ".")
    chat_calls: int = 0
    bodies: list = field(default_factory=list)
    client_ports: list = field(default_factory=list)  # one per answer: the connection it came on


def fake_engine_app(script: Script) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake",
                                            "context_length": 2048}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        for name in script.refuse_fields:
            if name in body:
                return JSONResponse({"error": {"message": f"Unrecognized request argument supplied: {name}"}},
                                    status_code=400)
        if body.get("max_tokens") == 1:  # a capability probe, not an answer
            return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "H"}, "finish_reason": "length"}]}
        script.chat_calls += 1
        script.bodies.append(body)
        script.client_ports.append(request.client.port)
        if script.chat_calls <= script.fail_first:
            return JSONResponse({"error": {"message": "engine warming up"}}, status_code=503)

        async def events():
            for i, word in enumerate(script.words):
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}) + "\n\n"
                await asyncio.sleep(0.01)
                if script.drop_after_first_token and i == 0:
                    raise RuntimeError("the fake engine drops the connection")
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
            yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(script.words),
                                                                  "total_tokens": 11 + len(script.words)}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
