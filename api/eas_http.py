"""EAS ChatLLM over HTTP (`POST /`) and the application-flow API (`POST /run`).

One handler, three reply shapes:
- JSON: the EAS reply object, plus `answer`, `session_id` and `trace_id`
  (`/run` also returns the whole `trace`);
- the EAS stream (`use_stream_chat`): JSON objects each followed by one NUL
  byte, `response` holding the whole answer so far;
- SSE (`Accept: text/event-stream`): `data: {"answer": <delta>}` events, then
  `data: {"done": true, "session_id", "trace_id", "usage", "finish_reason"}`.
The body is JSON (`prompt`, or `question` as the application flow names it)
or plain text; `X-Session-Id`/`X-User-Id` select the stored conversation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from typing import AsyncIterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.conversation import conversation_from, session_headers
from api.disconnect import ClientGone, unless_disconnected
from api.eas_codec import parse_body, reply_object, require_prompt, validate
from api.errors import error_response, to_api_error
from api.pacing import CumulativePacer
from api.schemas import EASChatRequest
from chat import ChatEvent, ChatService, ConversationRef

log = logging.getLogger(__name__)
router = APIRouter()

STREAM_DELIMITER = b"\0"
_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": EASChatRequest.model_json_schema()},
    "text/plain": {"schema": {"type": "string", "minLength": 1, "description": "the prompt"}},
}}}


def _frame(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8") + STREAM_DELIMITER


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


@router.post("/", summary="EAS ChatLLM chat and the application-flow API (JSON or plain-text body)",
             response_model=None, openapi_extra=_BODY)
async def eas_chat(request: Request) -> Response:
    return await _answer(request, full=False)


@router.post("/run", summary="Application-flow full mode: the answer and the trace of how it was made",
             response_model=None, openapi_extra=_BODY)
async def run_flow(request: Request) -> Response:
    return await _answer(request, full=True)


def _final(event: ChatEvent, req: EASChatRequest, conversation: Optional[ConversationRef], full: bool) -> dict:
    body = reply_object(event, req)
    body["answer"] = event.text
    body["session_id"] = conversation.session_id if conversation else None
    body["trace_id"] = event.trace_id
    if full and event.trace is not None:
        body["trace"] = event.trace.as_dict()
    return body


async def _answer(request: Request, full: bool) -> Response:
    settings = request.app.state.settings
    chat: ChatService = request.app.state.chat
    raw = await request.body()  # the guard has bounded its size
    req = validate(parse_body(raw, request.headers.get("content-type"), max_depth=settings.max_json_depth))
    require_prompt(req)
    conversation = conversation_from(request.headers, chat, explicit_history=req.explicit_history)
    headers = session_headers(conversation)
    request_id = f"eas-{uuid.uuid4().hex}"
    chat_request = req.to_chat_request(chat.sampling_defaults)
    chat_request.conversation = conversation
    sse = "text/event-stream" in request.headers.get("accept", "").lower()
    if not req.use_stream_chat and not sse:
        try:
            event = await unless_disconnected(request, chat.complete(chat_request, request_id))
        except ClientGone:
            log.info("client left before %s was answered; generation cancelled", request_id)
            return Response(status_code=499)
        return JSONResponse(_final(event, req, conversation, full), headers=headers)

    events = chat.stream(chat_request, request_id)
    # the first event comes before the response starts, so a too-long prompt is a 400
    try:
        first = await anext(events)
    except Exception as exc:
        await events.aclose()
        response = error_response(exc)
        response.headers.update(headers)
        return response

    pacer = CumulativePacer(len(raw))

    async def eas_stream() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(events):
            event = first
            try:
                while not event.done:
                    frame = _frame(reply_object(event, req, full_history=False))
                    if event.delta and pacer.allow(len(frame), len(event.text.encode("utf-8"))):
                        yield frame
                    event = await anext(events)
                yield _frame(_final(event, req, conversation, full))  # the last frame always goes
            except Exception as exc:  # a mid-stream failure is the last frame
                yield _frame(to_api_error(exc).body())

    async def sse_stream() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(events):
            event = first
            try:
                while True:
                    if event.delta:
                        yield _sse({"answer": event.delta})
                    if event.done:
                        break
                    event = await anext(events)
                done = {"done": True, "session_id": conversation.session_id if conversation else None,
                        "trace_id": event.trace_id, "usage": event.usage.as_dict(), "finish_reason": event.finish_reason}
                if event.sources is not None:
                    done["sources"] = event.sources
                if full and event.trace is not None:
                    done["trace"] = event.trace.as_dict()
                yield _sse(done)
            except Exception as exc:
                yield _sse(to_api_error(exc).body())

    if sse:
        return StreamingResponse(sse_stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers})
    return StreamingResponse(eas_stream(), media_type="application/octet-stream", headers=headers)
