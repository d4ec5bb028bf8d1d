"""Conversation -> messages -> engine -> cumulative events, for every surface.

Protocol adapters (EAS HTTP, WebSocket, OpenAI, the WebUI) only translate
their wire format into a ChatRequest and ChatEvents back out; system prompts,
history fitting, knowledge retrieval and sampling defaults are decided here once.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, AsyncIterator, Optional, Sequence

from chat.limits import Cancelled, ChatLimits, Preprocessor, RequestLimitError
from engine import ChatMessage, Engine, PromptTooLongError, SamplingParams, Usage
from engine.generation_defaults import GenerationDefaults

if TYPE_CHECKING:
    from knowledge.service import KnowledgeService

# an answer needs at least this much room before old turns are dropped to make it
MIN_ANSWER_ROOM = 256


class KnowledgeUnavailableError(Exception):
    """A grounded answer was asked for, but this server has no knowledge base."""


class ContextOverflowError(PromptTooLongError):
    """Prompt plus the requested answer length exceed the context (OpenAI-style strictness)."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, max_model_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
        Exception.__init__(
            self,
            f"this model's maximum context length is {max_model_len} tokens, but {prompt_tokens + max_new_tokens} "
            f"were requested ({prompt_tokens} in the messages, {max_new_tokens} for the completion); "
            "shorten the messages or ask for fewer tokens",
        )


@dataclass(frozen=True)
class KnowledgeQuery:
    kb: str = "default"
    top_k: int = 3


@dataclass
class ChatRequest:
    """A protocol-neutral conversation: system prompt, turns ending with the user's, settings.

    `fit_history`: drop the oldest turns when the conversation does not fit (EAS and
    WebUI behaviour); when False an oversized request is an error instead (OpenAI).
    `exact_max_tokens`: max_new_tokens was asked for explicitly and must fit, not be capped.
    """

    turns: Sequence[ChatMessage]
    system_prompt: str = ""
    params: SamplingParams = field(default_factory=SamplingParams)
    knowledge: Optional[KnowledgeQuery] = None
    fit_history: bool = True
    exact_max_tokens: bool = False
    history_param: str = "history"  # how the request's protocol names its earlier turns, for errors

    @classmethod
    def from_pairs(cls, prompt: str, system_prompt: str = "", history: Sequence[Sequence[str]] = (), **kw) -> "ChatRequest":
        turns: list[ChatMessage] = []
        for user, assistant in history:
            turns += [ChatMessage("user", user), ChatMessage("assistant", assistant)]
        turns.append(ChatMessage("user", prompt))
        return cls(turns=turns, system_prompt=system_prompt, **kw)

    @property
    def prompt(self) -> str:
        return self.turns[-1].content

    def messages(self, turns: Sequence[ChatMessage], user_message: Optional[str] = None) -> list[ChatMessage]:
        out = [ChatMessage("system", self.system_prompt)] if self.system_prompt else []
        out += list(turns)
        if user_message is not None:
            out[-1] = ChatMessage("user", user_message)
        return out


@dataclass
class ChatEvent:
    """The answer so far; the last event carries finish_reason, and usage is always current."""

    text: str
    delta: str
    finish_reason: Optional[str] = None
    usage: Usage = field(default_factory=Usage)
    sources: Optional[list[dict]] = None  # set when the answer is grounded in the knowledge base

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ChatService:
    def __init__(self, engine: Engine, knowledge: Optional["KnowledgeService"] = None,
                 limits: Optional[ChatLimits] = None) -> None:
        self.engine = engine
        self.knowledge = knowledge
        self.limits = limits or ChatLimits()
        self._preprocess = Preprocessor(self.limits.preprocess_threads)

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def sampling_defaults(self) -> GenerationDefaults:
        """Defaults for EAS-style requests (POST /, WebSocket, WebUI): the model's, with a bounded answer length."""
        defaults = self.engine.generation_defaults
        if defaults.max_new_tokens is None:
            defaults = replace(defaults, max_new_tokens=self.limits.default_max_new_tokens)
        return defaults

    async def stream(self, request: ChatRequest, request_id: Optional[str] = None) -> AsyncIterator[ChatEvent]:
        """Yield cumulative answer events; validation errors are raised before the first one."""
        request_id = request_id or uuid.uuid4().hex
        self.check(request)
        user_message, sources = None, None
        if request.knowledge is not None:
            retrieval = await self._retrieve(request)
            sources = [h.as_source() for h in retrieval.hits]
            if retrieval.prompt is None:
                # nothing relevant: say so plainly instead of letting the model invent an answer
                reply = retrieval.no_match_reply or ""
                yield ChatEvent(text=reply, delta=reply, finish_reason="stop", sources=[])
                return
            user_message = retrieval.prompt
        turns = await self._preprocess.run(self._fit, request, user_message)
        chunks = self.engine.generate(request.messages(turns, user_message), request.params, request_id)
        async for event in self._events(chunks, sources):
            yield event

    async def stream_completion(self, prompt: str, params: SamplingParams, request_id: Optional[str] = None) -> AsyncIterator[ChatEvent]:
        """A raw text completion (no chat template), for /v1/completions."""
        self._check_stop(params)
        chunks = self.engine.generate_from_prompt(prompt, params, request_id or uuid.uuid4().hex)
        async for event in self._events(chunks, None):
            yield event

    async def complete(self, request: ChatRequest, request_id: Optional[str] = None) -> ChatEvent:
        """The whole answer at once."""
        return await last_event(self.stream(request, request_id))

    @staticmethod
    async def _events(chunks, sources) -> AsyncIterator[ChatEvent]:
        text = ""
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                text += chunk.delta
                yield ChatEvent(text=text, delta=chunk.delta, finish_reason=chunk.finish_reason,
                                usage=chunk.usage, sources=sources)

    async def _retrieve(self, request: ChatRequest):
        if self.knowledge is None:
            raise KnowledgeUnavailableError("this server has no knowledge base")
        query = request.knowledge
        return await self.knowledge.retrieve(query.kb, request.prompt, query.top_k)

    def check(self, request: ChatRequest) -> None:
        """The request's bounds, before any work is done for it."""
        earlier = len(request.turns) // 2  # [user, assistant] pairs before the last user turn
        if earlier > self.limits.max_history_turns:
            raise RequestLimitError(request.history_param, f"{earlier} earlier turns; at most "
                                    f"{self.limits.max_history_turns} are accepted (--max-history-turns)")
        self._check_stop(request.params)

    def _check_stop(self, params: SamplingParams) -> None:
        if len(params.stop) > self.limits.max_stop_strings:
            raise RequestLimitError("stop", f"{len(params.stop)} stop strings; at most {self.limits.max_stop_strings} "
                                    "are accepted (--max-stop-strings)")
        longest = max((len(s) for s in params.stop), default=0)
        if longest > self.limits.max_stop_chars:
            raise RequestLimitError("stop", f"a stop string of {longest} characters; at most "
                                    f"{self.limits.max_stop_chars} are accepted (--max-stop-chars)")

    def _fit(self, cancelled: threading.Event, request: ChatRequest, user_message: Optional[str]) -> Sequence[ChatMessage]:
        """The turns that fit the context with room for the answer.

        Dropping the oldest exchanges one at a time and re-counting would
        tokenize the conversation once per dropped turn; the shortest-suffix
        search below tokenizes it O(log turns) times.
        """
        limit = self.engine.max_model_len
        want = request.params.max_new_tokens if request.exact_max_tokens else min(request.params.max_new_tokens, MIN_ANSWER_ROOM)
        turns = list(request.turns)
        # where the kept part may start: the first turn, or any later user turn
        starts = [0] + [i for i in range(1, len(turns)) if turns[i].role == "user"]

        def used(k: int) -> int:
            if cancelled.is_set():
                raise Cancelled()
            return self.engine.count_prompt_tokens(request.messages(turns[starts[k]:], user_message))

        keep, tokens = 0, used(0)
        if tokens + want > limit and request.fit_history and len(starts) > 1:
            low, high = 1, len(starts) - 1  # the last start (the user's own turn alone) is the fallback
            high_tokens = None
            while low < high:
                middle = (low + high) // 2
                count = used(middle)
                if count + want <= limit:
                    high, high_tokens = middle, count
                else:
                    low = middle + 1
            keep, tokens = low, high_tokens if high_tokens is not None else used(low)
        if tokens >= limit:
            raise PromptTooLongError(tokens, limit)
        if request.exact_max_tokens and tokens + request.params.max_new_tokens > limit:
            raise ContextOverflowError(tokens, request.params.max_new_tokens, limit)
        return turns[starts[keep]:]

    def shutdown(self) -> None:
        self._preprocess.shutdown()


async def last_event(events: AsyncIterator[ChatEvent]) -> ChatEvent:
    last = None
    async with contextlib.aclosing(events):
        async for event in events:
            last = event
    assert last is not None and last.done
    return last


def with_seed(params: SamplingParams, offset: int) -> SamplingParams:
    """Distinct but reproducible seeds for the n choices of one request."""
    return params if params.seed is None or offset == 0 else replace(params, seed=params.seed + offset)
