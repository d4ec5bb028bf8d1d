"""EAS ChatLLM over WebSocket: multi-round chat on one connection.

The connection keeps its own history and system prompt. Frames are handled
in the order they arrive (clients send several without waiting); every frame
is answered and then closed off with a `<EOS>` text frame. The token and the
page's origin were checked by the request guard before the upgrade.

A connection cannot hold more than its share: at most `--ws-max-pending`
frames wait for an answer (past that the server stops reading, and TCP slows
the sender down), its history keeps the newest `--max-history-turns` turns
within `--max-request-bytes` characters,
an answer frame the client leaves unread for `--ws-send-timeout` seconds
closes it, and so does `--ws-idle-timeout` seconds of silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Optional

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from api.body import too_large
from api.config import ServerConfig
from api.conversation import conversation_from
from api.eas_codec import parse_body, validate
from api.errors import to_api_error
from api.pacing import CumulativePacer
from chat import ChatService, ConversationRef

log = logging.getLogger(__name__)
router = APIRouter()

EOS = "<EOS>"


@dataclass
class Conversation:
    """What a connection remembers between frames."""

    max_turns: int
    max_chars: int  # what one HTTP request could carry: a connection holds no more
    system_prompt: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)
    busy: bool = False  # an answer is being produced
    last_activity: float = field(default_factory=time.monotonic)
    ref: Optional[ConversationRef] = None  # the stored session this connection continues, with history on
    loaded: bool = False  # the stored turns were read (on the first frame)
    told_session: bool = False  # the first reply names the session

    def remember(self, prompt: str, answer: str) -> None:
        """Append a turn; the oldest go past the turn or size bound (the newest are what a next answer needs)."""
        self.history.append((prompt, answer))
        del self.history[:-self.max_turns]
        size = sum(len(p) + len(a) for p, a in self.history)
        while len(self.history) > 1 and size > self.max_chars:
            dropped = self.history.pop(0)
            size -= len(dropped[0]) + len(dropped[1])


class SendTimeout(Exception):
    """The client did not take an answer frame in time."""


@router.websocket("/")
async def eas_websocket(websocket: WebSocket) -> None:
    settings: ServerConfig = websocket.app.state.settings
    chat: ChatService = websocket.app.state.chat
    try:
        ref = conversation_from(websocket.headers, chat, explicit_history=True)
    except Exception as exc:  # a malformed X-Session-Id: refused at the upgrade, with the reason
        await websocket.close(code=1008, reason=str(exc)[:120])
        return
    await websocket.accept(headers=[(b"x-session-id", ref.session_id.encode())] if ref else None)
    conversation = Conversation(max_turns=chat.limits.max_history_turns, max_chars=settings.max_request_bytes, ref=ref)
    frames: asyncio.Queue[str | bytes] = asyncio.Queue(maxsize=max(settings.ws_max_pending, 1))
    tasks = {
        asyncio.create_task(_read_frames(websocket, frames, conversation)),
        asyncio.create_task(_answer_frames(websocket, frames, conversation, settings)),
        asyncio.create_task(_close_when_idle(websocket, frames, conversation, settings.ws_idle_timeout)),
    }
    # whichever ends first (the client left, a send failed, the connection idled out) ends the others:
    # the answer in progress is aborted and queued frames are dropped
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _read_frames(websocket: WebSocket, frames: asyncio.Queue, conversation: Conversation) -> None:
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            conversation.last_activity = time.monotonic()
            # a full queue makes this wait, so the server stops reading and the sender is slowed by TCP
            await frames.put(message.get("text") if message.get("text") is not None else message.get("bytes") or b"")
    except (WebSocketDisconnect, RuntimeError):
        return


async def _close_when_idle(websocket: WebSocket, frames: asyncio.Queue, conversation: Conversation,
                           idle_timeout: float) -> None:
    while True:
        await asyncio.sleep(min(idle_timeout, 5.0))
        quiet = time.monotonic() - conversation.last_activity
        if quiet >= idle_timeout and not conversation.busy and frames.empty():
            log.info("closing a WebSocket idle for %.0f s", quiet)
            with contextlib.suppress(Exception):
                await websocket.close(code=1000, reason="idle")
            return


async def _send(websocket: WebSocket, text: str, timeout: float) -> None:
    try:
        await asyncio.wait_for(websocket.send_text(text), timeout)
    except asyncio.TimeoutError:
        raise SendTimeout() from None


async def _answer_frames(websocket: WebSocket, frames: asyncio.Queue, conversation: Conversation,
                         settings: ServerConfig) -> None:
    chat: ChatService = websocket.app.state.chat
    try:
        while True:
            raw = await frames.get()
            conversation.busy = True
            try:
                await _answer(websocket, chat, conversation, raw, settings)
            except (WebSocketDisconnect, asyncio.CancelledError, SendTimeout):
                raise
            except Exception as exc:
                await _send(websocket, json.dumps(to_api_error(exc).body(), ensure_ascii=False), settings.ws_send_timeout)
            await _send(websocket, EOS, settings.ws_send_timeout)
            conversation.busy = False
            conversation.last_activity = time.monotonic()
    except SendTimeout:
        log.info("closing a WebSocket whose client stopped reading")
        with contextlib.suppress(Exception):
            await websocket.close(code=1008, reason="answer frames were not read in time")


async def _answer(websocket: WebSocket, chat: ChatService, conversation: Conversation, raw, settings: ServerConfig) -> None:
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    if len(data) > settings.max_request_bytes:
        raise too_large(settings.max_request_bytes)
    fields = parse_body(data, None, json_expected=True, max_depth=settings.max_json_depth)
    req = validate(fields)
    if conversation.ref is not None and not conversation.loaded:
        conversation.loaded = True
        if conversation.ref.named and "history" not in fields:
            stored = await chat.history.turns_for(conversation.ref.session_id, conversation.ref.user_id, conversation.max_turns)
            conversation.history = list(stored or [])
    if "history" in fields:
        conversation.history = [tuple(p) for p in req.history]
    if "system_prompt" in fields:
        conversation.system_prompt = req.system_prompt
    if not req.prompt.strip():
        return  # a settings-only frame: answered with <EOS> alone
    chat_request = req.to_chat_request(chat.sampling_defaults, system_prompt=conversation.system_prompt, history=conversation.history)
    if conversation.ref is not None:
        # the connection's own history is what the answer uses; the exchange is stored in the session
        chat_request.conversation = replace(conversation.ref, use_stored=False)
    stream = req.use_stream_chat is not False  # streaming is the WebSocket default
    answer, sources, sent = "", None, ""
    pacer = CumulativePacer(len(data))
    events = chat.stream(chat_request, f"ws-{uuid.uuid4().hex}")
    async with contextlib.aclosing(events):
        async for event in events:
            answer, sources = event.text, event.sources
            size = len(answer.encode("utf-8"))
            # every frame is the whole answer so far: paced, and the complete answer always arrives
            if stream and event.delta and (event.done or pacer.allow(size, size)):
                await _send(websocket, answer, settings.ws_send_timeout)
                sent = answer
    if answer != sent or not stream:
        await _send(websocket, answer, settings.ws_send_timeout)
    if sources is not None:
        # grounded answers name their sources in one JSON frame before <EOS>
        await _send(websocket, json.dumps({"sources": sources}, ensure_ascii=False), settings.ws_send_timeout)
    if conversation.ref is not None and not conversation.told_session:
        conversation.told_session = True
        await _send(websocket, json.dumps({"session_id": conversation.ref.session_id}), settings.ws_send_timeout)
    conversation.remember(req.prompt, answer)
