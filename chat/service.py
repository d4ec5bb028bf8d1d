"""Conversation -> messages -> engine -> cumulative events, for every surface.

Protocol adapters (EAS HTTP, WebSocket, OpenAI, the WebUI) only translate
their wire format into a ChatRequest and ChatEvents back out; system prompts,
history fitting, knowledge retrieval and sampling defaults are decided here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, AsyncIterator, Optional, Sequence

from chat.limits import Cancelled, ChatLimits, Preprocessor, RequestLimitError
from chat.observer import ChatObserver, RequestTimings
from engine import ChatMessage, Engine, EngineError, PromptTooLongError, SamplingParams, Usage
from engine.generation_defaults import GenerationDefaults
from engine.text import utf8_safe

from history.tracing import Trace

if TYPE_CHECKING:
    from history import HistoryService
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


@dataclass(frozen=True)
class ConversationRef:
    """Which stored conversation a request belongs to.

    `named`: the client sent the session id (so it may have stored turns and an
    owner to check); `use_stored`: the request carries no history of its own, so
    the stored turns are its history; `store`: keep this exchange.
    """

    session_id: str
    user_id: str = ""
    named: bool = False
    use_stored: bool = True
    store: bool = True


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
    conversation: Optional[ConversationRef] = None

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
    trace: Optional[Trace] = None  # on the last event: what was done to answer

    @property
    def trace_id(self) -> Optional[str]:
        return self.trace.id if self.trace is not None else None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ChatService:
    def __init__(self, engine: Engine, knowledge: Optional["KnowledgeService"] = None,
                 limits: Optional[ChatLimits] = None, history: Optional["HistoryService"] = None,
                 observer: Optional[ChatObserver] = None) -> None:
        self.engine = engine
        self.knowledge = knowledge
        self.history = history
        self.observer = observer or ChatObserver()
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
        """Yield cumulative answer events; validation errors are raised before the first one.

        The last event carries the trace; with a conversation, the exchange is
        stored before it is yielded (so the next turn, on any instance, sees it),
        and an answer its client stopped is stored as stopped.
        """
        request_id = request_id or uuid.uuid4().hex
        trace = Trace()
        self.check(request)
        request = _utf8_request(request)
        request = await self._with_stored_turns(request, trace)
        user_message, sources = None, None
        if request.knowledge is not None:
            with trace.span("retrieval", kb=request.knowledge.kb, top_k=request.knowledge.top_k) as span:
                began = time.perf_counter()
                retrieval = await self._retrieve(request)
                self.observer.retrieval_finished(time.perf_counter() - began, len(retrieval.hits),
                                                 retrieval.prompt is not None)
                sources = [h.as_source() for h in retrieval.hits]
                span.attributes["hits"] = [{k: s.get(k) for k in ("file", "page", "score", "relevant")} for s in sources]
                span.attributes["matched"] = retrieval.prompt is not None
            if retrieval.prompt is None:
                # nothing relevant: say so plainly instead of letting the model invent an answer
                reply = retrieval.no_match_reply or ""
                final = ChatEvent(text=reply, delta=reply, finish_reason="stop", sources=[], trace=trace)
                await self._store(request, final, time.perf_counter(), None)
                yield final
                return
            user_message = retrieval.prompt
        with trace.span("prompt") as span:
            turns, prompt_tokens = await self._preprocess.run(self._fit, request, user_message)
            span.attributes.update(prompt_tokens=prompt_tokens, turns_given=len(request.turns), turns_kept=len(turns))
        params = request.params
        if params.max_new_tokens > self.engine.max_model_len - prompt_tokens:
            # the answer gets the room the context leaves (a remote engine would refuse the request instead)
            params = replace(params, max_new_tokens=max(1, self.engine.max_model_len - prompt_tokens))
        started, first_token_at, event = time.perf_counter(), None, None
        chunks = self.engine.generate(request.messages(turns, user_message), params, request_id)
        try:
            with trace.span("generation", model=self.model_name, temperature=params.temperature, top_p=params.top_p,
                            top_k=params.top_k, max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                            repetition_penalty=params.repetition_penalty, seed=params.seed) as span:
                ignored = self.engine.ignored_params(params)
                if ignored:
                    span.attributes["ignored_params"] = ignored  # the engine cannot honour these: say so
                async with contextlib.aclosing(self._events(chunks, sources)) as events:
                    async for event in events:
                        if first_token_at is None and event.delta:
                            first_token_at = time.perf_counter()
                            span.attributes["ttft_ms"] = round((first_token_at - started) * 1000, 2)
                        if not event.done:
                            yield event
                span.attributes.update(prompt_tokens=event.usage.prompt_tokens,
                                       completion_tokens=event.usage.completion_tokens, finish_reason=event.finish_reason)
            event.trace = trace
            await self._store(request, event, started, first_token_at)
            yield event
        except (GeneratorExit, asyncio.CancelledError):
            if event is not None and not event.done and event.text:
                stopped = replace(event, finish_reason="stopped", trace=trace)
                self._store_later(request, stopped, started, first_token_at)
            raise

    async def _with_stored_turns(self, request: ChatRequest, trace: Trace) -> ChatRequest:
        """The session's stored turns become the history of a request that brings none; the owner is checked."""
        ref = request.conversation
        if ref is None or not ref.named or self.history is None:
            return request
        with trace.span("history.load", session_id=ref.session_id) as span:
            stored = await self.history.turns_for(ref.session_id, ref.user_id, self.limits.max_history_turns)
            span.attributes["available"] = stored is not None
            span.attributes["turns"] = len(stored or ()) if ref.use_stored else 0
        if not ref.use_stored or not stored:
            return request
        earlier: list[ChatMessage] = []
        for question, answer in stored:
            earlier += [ChatMessage("user", question), ChatMessage("assistant", answer)]
        return replace(request, turns=earlier + list(request.turns))

    def _exchange(self, request: ChatRequest, event: ChatEvent, started: float, first_token_at: Optional[float]):
        from history import Exchange

        ref = request.conversation
        timings = {"total_ms": round((time.perf_counter() - started) * 1000, 2)}
        if first_token_at is not None:
            timings["ttft_ms"] = round((first_token_at - started) * 1000, 2)
        details = {"status": "stopped" if event.finish_reason == "stopped" else "complete",
                   "usage": event.usage.as_dict(), "timings": timings}
        if event.sources is not None:
            details["sources"] = event.sources
        return Exchange(session_id=ref.session_id, user_id=ref.user_id, question=request.prompt, answer=event.text,
                        finish_reason=event.finish_reason or "stop", trace_id=event.trace_id, details=details)

    def _storing(self, request: ChatRequest) -> bool:
        return self.history is not None and request.conversation is not None and request.conversation.store

    async def _store(self, request: ChatRequest, event: ChatEvent, started: float, first_token_at: Optional[float]) -> None:
        if self._storing(request):
            await self.history.record(self._exchange(request, event, started, first_token_at), event.trace)

    def _store_later(self, request: ChatRequest, event: ChatEvent, started: float, first_token_at: Optional[float]) -> None:
        if self._storing(request):
            self.history.record_later(self._exchange(request, event, started, first_token_at), event.trace)

    async def stream_completion(self, prompt: str, params: SamplingParams, request_id: Optional[str] = None) -> AsyncIterator[ChatEvent]:
        """A raw text completion (no chat template), for /v1/completions."""
        self._check_stop(params)
        chunks = self.engine.generate_from_prompt(utf8_safe(prompt), params, request_id or uuid.uuid4().hex)
        async for event in self._events(chunks, None):
            yield event

    async def complete(self, request: ChatRequest, request_id: Optional[str] = None) -> ChatEvent:
        """The whole answer at once."""
        return await last_event(self.stream(request, request_id))

    async def _events(self, chunks, sources) -> AsyncIterator[ChatEvent]:
        text = ""
        timings = RequestTimings(started=time.perf_counter())
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if chunk.delta:
                        now = time.perf_counter()
                        timings.first_token = timings.first_token or now
                        timings.token_times.append(now)
                    if chunk.finish_reason is not None:
                        timings.finish_reason, timings.queue_s = chunk.finish_reason, chunk.queue_s
                        timings.prompt_tokens = chunk.usage.prompt_tokens
                        timings.generation_tokens = chunk.usage.completion_tokens
                    text += chunk.delta
                    yield ChatEvent(text=text, delta=chunk.delta, finish_reason=chunk.finish_reason,
                                    usage=chunk.usage, sources=sources)
        except EngineError:
            timings.finish_reason = "error"
            raise
        finally:
            self.observer.generation_finished(timings, time.perf_counter())

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

    def _fit(self, cancelled: threading.Event, request: ChatRequest,
             user_message: Optional[str]) -> tuple[Sequence[ChatMessage], int]:
        """The turns that fit the context with room for the answer, and the prompt's tokens.

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
        return turns[starts[keep]:], tokens

    def shutdown(self) -> None:
        self._preprocess.shutdown()


def _utf8_request(request: ChatRequest) -> ChatRequest:
    """Lone surrogates that JSON let through would fail the tokenizer (a 500); they become U+FFFD."""
    texts = [request.system_prompt, *(t.content for t in request.turns)]
    if all(utf8_safe(t) is t for t in texts):
        return request
    return replace(request, system_prompt=utf8_safe(request.system_prompt),
                   turns=[ChatMessage(t.role, utf8_safe(t.content)) for t in request.turns])


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
