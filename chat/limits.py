"""Bounds on what one conversation may ask of the server, checked once for every surface."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass
class ChatLimits:
    max_history_turns: int = field(
        default=200,
        metadata={"help": "most earlier [user, assistant] turns one request (or one WebSocket) may carry; "
                          "more is a 400 (a WebSocket keeps the newest)"},
    )
    default_max_new_tokens: int = field(
        default=512,
        metadata={"help": "answer length in tokens when an EAS, WebSocket or WebUI request does not set max_new_tokens "
                          "(the model's generation config wins when it sets one; the context caps both)"},
    )
    max_stop_strings: int = field(default=16, metadata={"help": "most stop strings one request may set"})
    max_stop_chars: int = field(default=256, metadata={"help": "longest stop string accepted, in characters"})
    preprocess_threads: int = field(
        default=2,
        metadata={"help": "threads that fit histories into the context and tokenize prompts; "
                          "more requests wait their turn instead of crowding the CPU"},
    )


class RequestLimitError(ValueError):
    """A request beyond a bound; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class Cancelled(Exception):
    """The caller went away; CPU work stops at its next check."""


class Preprocessor:
    """CPU-heavy request preparation on a few threads, stopped when the caller goes away.

    `work(cancelled, ...)` runs on a pool thread and should check the event
    between steps; if the awaiting task is cancelled (the client left), work
    that has not started never starts and work that has sees the event set.
    """

    def __init__(self, threads: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="preprocess")

    async def run(self, work: Callable[..., T], *args) -> T:
        cancelled = threading.Event()
        future = self._pool.submit(work, cancelled, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            cancelled.set()
            future.cancel()
            raise

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
