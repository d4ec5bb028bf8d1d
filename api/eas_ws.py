"""EAS ChatLLM over WebSocket: multi-round chat on one connection.

The connection keeps its own history and system prompt. Frames are handled
in the order they arrive (clients send several without waiting); every frame
is answered and then closed off with a `<EOS>` text frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from typing import Optional

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from api.auth import check_token
from api.body import too_large
from api.eas_codec import parse_body, validate
from api.errors import APIError, to_api_error
from chat import ChatService

log = logging.getLogger(__name__)
router = APIRouter()

EOS = "<EOS>"


@dataclass
class Conversation:
    """What a connection remembers between frames."""

    system_prompt: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)


@router.websocket("/")
async def eas_websocket(websocket: WebSocket) -> None:
    try:
        check_token(websocket)
    except APIError as err:
        await _deny(websocket, err)
        return
    await websocket.accept()
    frames: asyncio.Queue[Optional[str | bytes]] = asyncio.Queue()
    worker = asyncio.create_task(_answer_frames(websocket, frames))
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            frames.put_nowait(message.get("text") if message.get("text") is not None else message.get("bytes") or b"")
    except WebSocketDisconnect:
        pass
    finally:
        # the client is gone: stop the answer in progress and drop queued frames
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker


async def _deny(websocket: WebSocket, err: APIError) -> None:
    """Refuse the upgrade with a JSON 401 where the server can, else close with 1008."""
    try:
        await websocket.send_denial_response(JSONResponse(err.body(), status_code=err.status))
    except RuntimeError:
        await websocket.close(code=1008, reason=err.message[:120])


async def _answer_frames(websocket: WebSocket, frames: asyncio.Queue) -> None:
    chat: ChatService = websocket.app.state.chat
    limit: int = websocket.app.state.settings.max_request_bytes
    conversation = Conversation()
    while True:
        raw = await frames.get()
        try:
            await _answer(websocket, chat, conversation, raw, limit)
        except (WebSocketDisconnect, asyncio.CancelledError):
            raise
        except Exception as exc:
            await websocket.send_text(json.dumps(to_api_error(exc).body(), ensure_ascii=False))
        await websocket.send_text(EOS)


async def _answer(websocket: WebSocket, chat: ChatService, conversation: Conversation, raw, limit: int) -> None:
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    if len(data) > limit:
        raise too_large(limit)
    fields = parse_body(data, None, json_expected=True)
    req = validate(fields)
    if "history" in fields:
        conversation.history = [tuple(p) for p in req.history]
    if "system_prompt" in fields:
        conversation.system_prompt = req.system_prompt
    if not req.prompt.strip():
        return  # a settings-only frame: answered with <EOS> alone
    chat_request = req.to_chat_request(system_prompt=conversation.system_prompt, history=conversation.history)
    stream = req.use_stream_chat is not False  # streaming is the WebSocket default
    answer, sources = "", None
    events = chat.stream(chat_request, f"ws-{uuid.uuid4().hex}")
    async with contextlib.aclosing(events):
        async for event in events:
            answer, sources = event.text, event.sources
            if stream and event.delta:
                await websocket.send_text(answer)
    if not stream:
        await websocket.send_text(answer)
    if sources is not None:
        # grounded answers name their sources in one JSON frame before <EOS>
        await websocket.send_text(json.dumps({"sources": sources}, ensure_ascii=False))
    conversation.history.append((req.prompt, answer))
