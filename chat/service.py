"""Conversation -> messages -> engine -> cumulative events, for every surface.

Protocol adapters (EAS HTTP, WebSocket, OpenAI, the WebUI) only translate
their wire format into a ChatRequest and ChatEvents back out; system prompts,
history fitting and sampling defaults are decided here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence

from engine import ChatMessage, Engine, PromptTooLongError, SamplingParams, Usage

# an answer needs at least this much room before old turns are dropped to make it
MIN_ANSWER_ROOM = 256


@dataclass
class ChatRequest:
    """A protocol-neutral chat turn: earlier turns, the new user message, settings."""

    prompt: str
    system_prompt: str = ""
    history: Sequence[tuple[str, str]] = ()
    params: SamplingParams = field(default_factory=SamplingParams)

    def messages(self, history: Optional[Sequence[tuple[str, str]]] = None) -> list[ChatMessage]:
        turns = self.history if history is None else history
        out = [ChatMessage("system", self.system_prompt)] if self.system_prompt else []
        for user, assistant in turns:
            out += [ChatMessage("user", user), ChatMessage("assistant", assistant)]
        out.append(ChatMessage("user", self.prompt))
        return out


@dataclass
class ChatEvent:
    """The answer so far; the last event carries finish_reason and usage."""

    text: str
    delta: str
    finish_reason: Optional[str] = None
    usage: Usage = field(default_factory=Usage)
    history_used: int = 0  # how many history pairs fitted into the context

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ChatService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    async def stream(self, request: ChatRequest, request_id: Optional[str] = None) -> AsyncIterator[ChatEvent]:
        """Yield cumulative answer events; raises PromptTooLongError before the first one."""
        request_id = request_id or uuid.uuid4().hex
        history = await asyncio.to_thread(self._fit_history, request)
        text = ""
        chunks = self.engine.generate(request.messages(history), request.params, request_id)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                text += chunk.delta
                yield ChatEvent(
                    text=text,
                    delta=chunk.delta,
                    finish_reason=chunk.finish_reason,
                    usage=chunk.usage,
                    history_used=len(history),
                )

    async def complete(self, request: ChatRequest, request_id: Optional[str] = None) -> ChatEvent:
        """The whole answer at once."""
        last = None
        async for event in self.stream(request, request_id):
            last = event
        assert last is not None and last.done
        return last

    def _fit_history(self, request: ChatRequest) -> Sequence[tuple[str, str]]:
        """Drop the oldest turns until the answer has room; the new prompt itself must fit."""
        limit = self.engine.max_model_len
        want = min(request.params.max_new_tokens, MIN_ANSWER_ROOM)
        history = list(request.history)
        while True:
            used = self.engine.count_prompt_tokens(request.messages(history))
            if used + want <= limit or not history:
                break
            history.pop(0)
        if used >= limit:
            raise PromptTooLongError(used, limit)
        return history
