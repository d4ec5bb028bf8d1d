"""EAS ChatLLM over HTTP: `POST /` with a JSON or plain-text body.

Streaming replies are JSON objects each followed by one NUL byte, the
`response` field holding the whole answer so far.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.disconnect import ClientGone, unless_disconnected
from api.eas_codec import parse_body, reply_object, require_prompt, validate
from api.errors import error_response, to_api_error
from api.pacing import CumulativePacer
from api.schemas import EASChatRequest
from chat import ChatService

log = logging.getLogger(__name__)
router = APIRouter()

STREAM_DELIMITER = b"\0"


def _frame(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + STREAM_DELIMITER


@router.post(
    "/",
    summary="EAS ChatLLM chat (JSON or plain-text body)",
    response_model=None,
    # the body is read by hand (plain text or JSON, bounded by the guard); this describes it
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": EASChatRequest.model_json_schema()},
        "text/plain": {"schema": {"type": "string", "minLength": 1, "description": "the prompt"}},
    }}},
)
async def eas_chat(request: Request) -> Response:
    settings = request.app.state.settings
    chat: ChatService = request.app.state.chat
    raw = await request.body()  # the guard has bounded its size
    req = validate(parse_body(raw, request.headers.get("content-type"), max_depth=settings.max_json_depth))
    require_prompt(req)
    request_id = f"eas-{uuid.uuid4().hex}"
    chat_request = req.to_chat_request(chat.sampling_defaults)
    if not req.use_stream_chat:
        try:
            event = await unless_disconnected(request, chat.complete(chat_request, request_id))
        except ClientGone:
            log.info("client left before %s was answered; generation cancelled", request_id)
            return Response(status_code=499)
        return JSONResponse(reply_object(event, req))

    events = chat.stream(chat_request, request_id)
    # the first event comes before the response starts, so a too-long prompt is a 400
    try:
        first = await anext(events)
    except Exception as exc:
        await events.aclose()
        return error_response(exc)

    pacer = CumulativePacer(len(raw))

    async def body() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(events):
            event = first
            try:
                while not event.done:
                    frame = _frame(reply_object(event, req, full_history=False))
                    if event.delta and pacer.allow(len(frame), len(event.text.encode("utf-8"))):
                        yield frame
                    event = await anext(events)
                yield _frame(reply_object(event, req))  # the last frame always goes: usage and the whole history
            except Exception as exc:  # a mid-stream failure is the last frame
                yield _frame(to_api_error(exc).body())

    return StreamingResponse(body(), media_type="application/octet-stream")
