"""Conversation -> messages -> engine -> cumulative events, for every surface.

Protocol adapters (EAS HTTP, WebSocket, OpenAI, the WebUI) only translate
their wire format into a ChatRequest and ChatEvents back out; system prompts,
history fitting, knowledge retrieval and sampling defaults are decided here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Optional, Sequence

from engine import ChatMessage, Engine, PromptTooLongError, SamplingParams, Usage

if TYPE_CHECKING:
    from knowledge.service import KnowledgeService

# an answer needs at least this much room before old turns are dropped to make it
MIN_ANSWER_ROOM = 256


class KnowledgeUnavailableError(Exception):
    """A grounded answer was asked for, but this server has no knowledge base."""


@dataclass(frozen=True)
class KnowledgeQuery:
    kb: str = "default"
    top_k: int = 3


@dataclass
class ChatRequest:
    """A protocol-neutral chat turn: earlier turns, the new user message, settings."""

    prompt: str
    system_prompt: str = ""
    history: Sequence[tuple[str, str]] = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    knowledge: Optional[KnowledgeQuery] = None

    def messages(self, history: Sequence[tuple[str, str]], user_message: Optional[str] = None) -> list[ChatMessage]:
        out = [ChatMessage("system", self.system_prompt)] if self.system_prompt else []
        for user, assistant in history:
            out += [ChatMessage("user", user), ChatMessage("assistant", assistant)]
        out.append(ChatMessage("user", self.prompt if user_message is None else user_message))
        return out


@dataclass
class ChatEvent:
    """The answer so far; the last event carries finish_reason and usage."""

    text: str
    delta: str
    finish_reason: Optional[str] = None
    usage: Usage = field(default_factory=Usage)
    sources: Optional[list[dict]] = None  # set when the answer is grounded in the knowledge base

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ChatService:
    def __init__(self, engine: Engine, knowledge: Optional["KnowledgeService"] = None) -> None:
        self.engine = engine
        self.knowledge = knowledge

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    async def stream(self, request: ChatRequest, request_id: Optional[str] = None) -> AsyncIterator[ChatEvent]:
        """Yield cumulative answer events; validation errors are raised before the first one."""
        request_id = request_id or uuid.uuid4().hex
        user_message, sources = request.prompt, None
        if request.knowledge is not None:
            retrieval = await self._retrieve(request)
            sources = [h.as_source() for h in retrieval.hits]
            if retrieval.prompt is None:
                # nothing relevant: say so plainly instead of letting the model invent an answer
                reply = retrieval.no_match_reply or ""
                yield ChatEvent(text=reply, delta=reply, finish_reason="stop", sources=[])
                return
            user_message = retrieval.prompt
        history = await asyncio.to_thread(self._fit_history, request, user_message)
        text = ""
        chunks = self.engine.generate(request.messages(history, user_message), request.params, request_id)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                text += chunk.delta
                yield ChatEvent(
                    text=text,
                    delta=chunk.delta,
                    finish_reason=chunk.finish_reason,
                    usage=chunk.usage,
                    sources=sources,
                )

    async def complete(self, request: ChatRequest, request_id: Optional[str] = None) -> ChatEvent:
        """The whole answer at once."""
        last = None
        async for event in self.stream(request, request_id):
            last = event
        assert last is not None and last.done
        return last

    async def _retrieve(self, request: ChatRequest):
        if self.knowledge is None:
            raise KnowledgeUnavailableError("this server has no knowledge base")
        query = request.knowledge
        return await self.knowledge.retrieve(query.kb, request.prompt, query.top_k)

    def _fit_history(self, request: ChatRequest, user_message: str) -> Sequence[tuple[str, str]]:
        """Drop the oldest turns until the answer has room; the new message itself must fit."""
        limit = self.engine.max_model_len
        want = min(request.params.max_new_tokens, MIN_ANSWER_ROOM)
        history = list(request.history)
        while True:
            used = self.engine.count_prompt_tokens(request.messages(history, user_message))
            if used + want <= limit or not history:
                break
            history.pop(0)
        if used >= limit:
            raise PromptTooLongError(used, limit)
        return history
