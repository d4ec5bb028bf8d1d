"""Admission to an engine that allocates its KV cache up front: a bounded, first-come queue.

llama.cpp's server takes every request it is sent and fails one mid-answer
when its cache runs out; so requests are let in here only while their whole
reservation (prompt plus the most they may generate) fits, and only as many
as it has parallel slots. The rest wait in arrival order, up to `max_waiting`;
past that a request is refused at once (503), as with the in-process runner.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass

from engine.types import EngineOverloadedError


@dataclass
class _Waiter:
    tokens: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class TokenAdmission:
    """Thread-safe: requests may come from more than one event loop (the API's and the WebUI's)."""

    def __init__(self, capacity_tokens: int, max_running: int, max_waiting: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self.running = 0
        self.reserved_tokens = 0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, tokens: int) -> None:
        """Wait for room for `tokens`; raises EngineOverloadedError when the queue is full."""
        tokens = min(tokens, self.capacity_tokens)  # the context cap keeps any one request within the pool
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._fits(tokens):
                self._take(tokens)
                return
            if len(self._waiters) >= self.max_waiting:
                raise EngineOverloadedError(
                    f"the server is at capacity ({self.running} answers running, {len(self._waiters)} waiting); "
                    f"retry shortly"
                )
            waiter = _Waiter(tokens, loop, loop.create_future())
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    return_room = False
                else:  # granted just as it was cancelled: give the room back
                    return_room = True
            if return_room:
                self.release(tokens)
            raise

    def release(self, tokens: int) -> None:
        tokens = min(tokens, self.capacity_tokens)
        with self._lock:
            self.running -= 1
            self.reserved_tokens -= tokens
            while self._waiters and self._fits(self._waiters[0].tokens):
                waiter = self._waiters.popleft()
                self._take(waiter.tokens)
                waiter.loop.call_soon_threadsafe(_grant, waiter.future)

    def _fits(self, tokens: int) -> bool:
        return self.running < self.max_running and self.reserved_tokens + tokens <= self.capacity_tokens

    def _take(self, tokens: int) -> None:
        self.running += 1
        self.reserved_tokens += tokens


def _grant(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
