"""An OpenAI-compatible inference server as the model runner.

vLLM, SGLang, TGI, Ollama, `transformers serve` or another ChatLLM-WebUI do
the model work; everything above the engine (prompts' history fitting,
knowledge, conversations, every surface) stays here. Answers stream token by
token over one pooled HTTP client; closing a stream closes the upstream
response at once, which is how those servers learn a client has gone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Sequence

import httpx

from engine.base import Engine
from engine.generation_defaults import GenerationDefaults
from engine.remote_errors import (
    EngineRejectedError,
    EngineUnavailableError,
    EngineUpstreamError,
    error_for_status,
    explain_transport_error,
)
from engine.remote_stream import drain, error_text, mapped_finish_reason, parse_event, sse_events
from engine.types import ChatMessage, EngineOverloadedError, GenerationChunk, SamplingParams, Usage

log = logging.getLogger(__name__)

#: request fields outside OpenAI's own set; servers differ on which they take
EXTENSIONS = ("top_k", "repetition_penalty", "ignore_eos")
#: tokens a message's role and framing take in every common chat template, for the estimate below
MESSAGE_OVERHEAD_TOKENS = 8
READY_CACHE_S = 1.0
OURS = "chatllm-webui"
_END = object()  # the engine's stream ended normally
DRAIN_S = 2.0  # how long a finished answer's last bytes may take before its connection is dropped instead
KEEPALIVE_S = 3.0  # idle pooled connections expire before the usual 5 s server keep-alive
# httpcore scans its whole pool, twice nested, whenever a request starts or ends: with 32 streams at once that
# scan was a quarter of the front's CPU per request. Streams are spread over this many small pools instead,
# each to the least busy (the first when idle, so that one-at-a-time traffic keeps reusing one connection).
POOLS = 16


@dataclass(frozen=True)
class RemoteSettings:
    url: str  # the server's OpenAI base, ending in /v1
    api_key: Optional[str] = None
    model: Optional[str] = None  # default: the first model the server lists
    max_model_len: Optional[int] = None  # default: what /v1/models says
    timeout: float = 600.0  # longest silence between two streamed chunks
    retries: int = 2  # attempts more, only before the first token
    wait: float = 60.0  # how long start-up waits for the server to answer

    @property
    def root(self) -> str:
        """The server's root, where vLLM and ChatLLM-WebUI serve /tokenize."""
        return self.url[:-3] if self.url.endswith("/v1") else self.url


@dataclass(frozen=True)
class ServerFacts:
    model: str
    max_model_len: Optional[int]
    owned_by: str
    lists_models: bool = True  # False: /models fails there, so readiness is "answers HTTP at all"


def sampling_body(params: SamplingParams, supported: frozenset[str]) -> tuple[dict, list[str]]:
    """The OpenAI request fields for `params`, and the fields asked for that the server cannot take."""
    body: dict = {"max_tokens": params.max_new_tokens, "temperature": 0.0 if params.greedy else params.temperature}
    wanted: dict = {}
    if not params.greedy:
        body["top_p"] = params.top_p
        if params.top_k > 0:
            wanted["top_k"] = params.top_k
    if params.repetition_penalty != 1.0:
        wanted["repetition_penalty"] = params.repetition_penalty
    if params.ignore_eos:
        wanted["ignore_eos"] = True
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    ignored = sorted(name for name in wanted if name not in supported)
    body.update({name: value for name, value in wanted.items() if name in supported})
    return body, ignored


def estimate_tokens(messages: Sequence[ChatMessage]) -> int:
    """An upper-leaning estimate when the server cannot count: a token is rarely under 3 UTF-8 bytes
    (English runs ~4, Chinese one character of 3 bytes), so history fitting errs towards room to spare."""
    return sum(math.ceil(len(m.content.encode("utf-8")) / 3) + MESSAGE_OVERHEAD_TOKENS for m in messages)


class RemoteEngine(Engine):
    backend_name = "openai"

    def __init__(self, settings: RemoteSettings, facts: ServerFacts, supported: frozenset[str],
                 counts_tokens: bool, generation_defaults: GenerationDefaults = GenerationDefaults(),
                 fallback_max_model_len: int = 4096) -> None:
        self.settings = settings
        self.model_name = facts.model
        self.max_model_len = settings.max_model_len or facts.max_model_len or fallback_max_model_len
        self.generation_defaults = generation_defaults
        self.supported = supported
        self.counts_tokens = counts_tokens
        self._owned_by = facts.owned_by
        self._lists_models = facts.lists_models
        self.process = None  # the supervised engine process (--backend vllm), stopped with this engine
        self._headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._clients: list[httpx.AsyncClient] = []
        self._client_loop: Optional[asyncio.AbstractEventLoop] = None
        self._in_flight = [0] * POOLS  # exchanges per client, counted on the event loop
        self._sync = httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0), headers=self._headers)
        self._live: dict[str, asyncio.Future] = {}  # request id -> its exchange with the engine
        self._draining: set[asyncio.Future] = set()  # finished exchanges reading their last bytes
        self._lock = threading.Lock()
        self._ready = True
        self._checked_at = 0.0
        self._last_error: Optional[str] = None
        self._warned: set[str] = set()
        self._stats = {"requests": 0, "running": 0, "failed": 0, "retries": 0, "tokens_generated": 0,
                       "ignored_params": 0, "cancelled": 0}
        self._prefix = {"query_tokens": 0, "hit_tokens": 0}  # from the engine's usage.prompt_tokens_details

    # ---- Engine ------------------------------------------------------------------------

    def generate(self, messages: Sequence[ChatMessage], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        body = {"messages": [{"role": m.role, "content": m.content} for m in messages]}
        return self._stream("chat/completions", body, params, request_id, chat=True)

    def generate_from_prompt(self, prompt: str, params: SamplingParams, request_id: str) -> AsyncIterator[GenerationChunk]:
        return self._stream("completions", {"prompt": prompt}, params, request_id, chat=False)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        if not self.counts_tokens:
            return estimate_tokens(messages)
        body = {"model": self.model_name, "add_generation_prompt": True,
                "messages": [{"role": m.role, "content": m.content} for m in messages]}
        try:
            response = self._sync.post(self.settings.root + "/tokenize", json=body)
        except httpx.HTTPError as exc:
            self._mark_down(explain_transport_error(self.settings.url, exc))
            raise EngineUnavailableError(self._last_error) from None
        if response.status_code != 200:
            raise error_for_status(response.status_code, error_text(response.content), self.settings.url)
        return int(response.json()["count"])

    def abort(self, request_id: str) -> None:
        with self._lock:
            exchange = self._live.get(request_id)
        if exchange is not None:
            exchange.cancel()

    def ignored_params(self, params: SamplingParams) -> list[str]:
        """Fields of `params` this server cannot honour (reported in traces, logs and /metrics)."""
        return sampling_body(params, self.supported)[1]

    def health(self) -> dict:
        return {
            "backend": self.backend_name,
            "engine_url": self.settings.url,
            "model": self.model_name,
            "max_model_len": self.max_model_len,
            "ready": self._ready,
            "last_error": self._last_error,
            "served_by": self._owned_by,
            "sampling_extensions": sorted(self.supported),
            "unsupported_params": sorted(set(EXTENSIONS) - self.supported),
            "token_counts": "server /tokenize" if self.counts_tokens else "estimated from UTF-8 length",
            "generation_defaults": {"source": self.generation_defaults.source, **self.generation_defaults.values()},
            **self._stats,
            "prefix_cache": dict(self._prefix),
            **({"process": self.process.health()} if self.process is not None else {}),
        }

    async def ready(self) -> bool:
        """Whether the server answers now; asked at most once a second, whatever the probe rate."""
        if time.monotonic() - self._checked_at < READY_CACHE_S:
            return self._ready
        self._checked_at = time.monotonic()
        try:
            response = await self._http().get(self.settings.url + "/models", headers=self._headers, timeout=2.0)
        except httpx.HTTPError as exc:
            self._mark_down(explain_transport_error(self.settings.url, exc))
            return False
        if response.status_code != 200 and (self._lists_models or response.status_code in (502, 503, 504)):
            self._mark_down(f"the inference engine at {self.settings.url} answered /models with {response.status_code}")
            return False
        self._mark_up()
        return True

    def shutdown(self) -> None:
        self._sync.close()
        if self.process is not None:
            self.process.stop()

    # ---- streaming -----------------------------------------------------------------------

    def _http(self, index: int = 0) -> httpx.AsyncClient:
        # clients belong to the event loop that first used them
        loop = asyncio.get_running_loop()
        if not self._clients or self._client_loop is not loop:
            # one TLS context for all of them: each of its own would read the CA bundle again (25 ms)
            tls = httpx.create_ssl_context()  # what each client would make: CA bundle, SSL_CERT_FILE honoured
            self._clients = [httpx.AsyncClient(
                verify=tls,
                timeout=httpx.Timeout(self.settings.timeout, connect=5.0),
                # idle connections are dropped before the servers' own 5 s keep-alive (uvicorn, llama.cpp's
                # cpp-httplib) would close them under a request just sent on one
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=256 // POOLS,
                                    keepalive_expiry=KEEPALIVE_S),
            ) for _ in range(POOLS)]
            self._client_loop = loop
            self._in_flight = [0] * POOLS
        return self._clients[index]

    def _payload(self, path_body: dict, params: SamplingParams) -> dict:
        sampling, ignored = sampling_body(params, self.supported)
        for name in ignored:
            self._stats["ignored_params"] += 1
            if name not in self._warned:
                self._warned.add(name)
                log.warning("the inference engine at %s does not take %r: requests setting it are answered without it",
                            self.settings.url, name)
        body = {"model": self.model_name, "stream": True, "stream_options": {"include_usage": True},
                **path_body, **sampling}
        if self._owned_by == OURS:
            body["store"] = False  # another ChatLLM-WebUI as the engine: the conversation is kept here
        return body

    async def _stream(self, path: str, path_body: dict, params: SamplingParams, request_id: str,
                      chat: bool) -> AsyncIterator[GenerationChunk]:
        body = self._payload(path_body, params)
        url = f"{self.settings.url}/{path}"
        self._stats["requests"] += 1
        self._stats["running"] += 1
        usage, produced, finish = Usage(), 0, None
        try:
            for attempt in range(self.settings.retries + 1):
                started = complete = False
                events: asyncio.Queue = asyncio.Queue()
                exchange = asyncio.ensure_future(self._exchange(url, body, events))
                with self._lock:
                    self._live[request_id] = exchange
                try:
                    while (event := await events.get()) is not _END:
                        if isinstance(event, BaseException):
                            raise event
                        delta, finish, event_usage = parse_event(event, chat)
                        if event_usage is not None:
                            usage = event_usage
                        if delta:
                            started = True
                            produced += 1
                            yield GenerationChunk(delta=delta)
                    complete = True
                    break
                except (httpx.TransportError, EngineUnavailableError, EngineUpstreamError) as exc:
                    # a retry after the first token would repeat text the client already has
                    if started or attempt == self.settings.retries or not getattr(exc, "retryable", True):
                        raise self._failure(exc) from None
                    self._stats["retries"] += 1
                    log.info("inference engine attempt %d failed (%s); retrying", attempt + 1, exc)
                    await asyncio.sleep(0.2 * 2 ** attempt)
                finally:
                    with self._lock:
                        self._live.pop(request_id, None)
                    if complete:  # it reads the body's last bytes, then returns the connection to the pool
                        self._draining.add(exchange)
                        exchange.add_done_callback(self._draining.discard)
                    else:  # the connection closes and the engine stops
                        exchange.cancel()
            if usage.completion_tokens == 0:
                usage.completion_tokens = produced  # servers that send no usage: one chunk is about one token
            self._stats["tokens_generated"] += usage.completion_tokens
            self._prefix["query_tokens"] += usage.prompt_tokens
            self._prefix["hit_tokens"] += usage.cached_tokens
            yield GenerationChunk(delta="", finish_reason=mapped_finish_reason(finish), usage=usage)
        except (EngineRejectedError, EngineOverloadedError):
            raise
        except (GeneratorExit, asyncio.CancelledError):
            self._stats["cancelled"] += 1
            raise
        except BaseException:
            self._stats["failed"] += 1
            raise
        finally:
            self._stats["running"] -= 1

    async def _exchange(self, url: str, body: dict, events: asyncio.Queue) -> None:
        """One HTTP exchange with the engine, feeding `events`, in a task of its own.

        The consumer's task may sit in a server's cancel scope that, once the
        client has gone, cancels every await in it, the pool's own closing of
        the connection included: the connection would stay open and the engine
        would generate for nobody. Cancelling this task closes it properly.
        """
        index = min(range(POOLS), key=self._in_flight.__getitem__)
        client = self._http(index)
        self._in_flight[index] += 1
        try:
            async with client.stream("POST", url, json=body, headers=self._headers) as response:
                if response.status_code != 200:
                    raise error_for_status(response.status_code, error_text(await response.aread()), self.settings.url)
                self._mark_up()
                lines = response.aiter_lines()
                async for event in sse_events(lines):
                    events.put_nowait(event)
                events.put_nowait(_END)  # the answer is whole: its consumer goes on now
                # the body ends right after [DONE]; read to that end, the connection goes back to the pool
                # (closed with bytes unread, it would be closed, and every request would open a new one)
                try:
                    await asyncio.wait_for(drain(lines), DRAIN_S)
                except (asyncio.TimeoutError, httpx.HTTPError):
                    pass  # a server that keeps the body open: this connection is closed, nothing else changes
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer, who decides on retries
            events.put_nowait(exc)
        finally:
            self._in_flight[index] = max(0, self._in_flight[index] - 1)  # (reset if the loop changed meanwhile)

    def _failure(self, exc: BaseException) -> BaseException:
        if isinstance(exc, httpx.TransportError):
            message = explain_transport_error(self.settings.url, exc)
            if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                self._mark_down(message)
                return EngineUnavailableError(message)
            return EngineUpstreamError(message)
        if isinstance(exc, EngineUnavailableError):
            self._mark_down(str(exc))
        return exc

    def _mark_down(self, message: str) -> None:
        if self._ready:
            log.warning("%s", message)
        self._ready, self._last_error = False, message

    def _mark_up(self) -> None:
        if not self._ready:
            log.info("the inference engine at %s answers again", self.settings.url)
        self._ready = True
