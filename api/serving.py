"""The uvicorn settings the service runs with, in one place for the command line and the tests.

uvicorn bounds concurrent connections (`limit_concurrency`: 503 past it) and
idle keep-alive connections, but waits forever for a client that opens a
connection and sends its headers a byte at a time; a few hundred of those
would hold every slot. The HTTP protocol below closes a connection whose
request headers are not complete within `--header-timeout` seconds or grow
past `MAX_HEADER_BYTES`, and answers past the connection cap in the service's
JSON error shape.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

import uvicorn

from api.config import ServerConfig
from api.errors import APIError, error_response

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024


async def _unavailable(scope: dict, receive: Any, send: Any) -> None:
    response = error_response(APIError(
        503, "the server has too many open connections (--max-connections); retry shortly",
        type_="overloaded_error", code="too_many_connections", retry_after=5))
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


def _guarded_protocol(header_timeout: float) -> Any:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn[standard] brings httptools; without it, uvicorn's defaults apply
        log.warning("httptools is not installed: no header timeout")
        return "auto"

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: Optional[asyncio.TimerHandle] = None
        _header_bytes = 0

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None:  # still in a request's headers after this data
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._close("request headers larger than %d bytes" % MAX_HEADER_BYTES)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_headers()  # the next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._stop_waiting()
            limit = self.limit_concurrency
            if limit is None or (len(self.connections) < limit and len(self.tasks) < limit):
                super().on_headers_complete()
                return
            # over the connection cap: uvicorn's own answer is plain text; ours is the JSON error shape
            app, self.app, self.limit_concurrency = self.app, _unavailable, None
            try:
                super().on_headers_complete()
            finally:
                self.app, self.limit_concurrency = app, limit

        def connection_lost(self, exc: Optional[Exception]) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _await_headers(self) -> None:
            if self._header_timer is None:
                self._header_bytes = 0
                self._header_timer = self.loop.call_later(header_timeout, self._close, "headers too slow")

        def _stop_waiting(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _close(self, why: str) -> None:
            self._stop_waiting()
            if not self.transport.is_closing():
                log.debug("closing connection from %s: %s", self.client, why)
                self.transport.close()

    return HeaderTimeoutProtocol


def uvicorn_config(app: Any, settings: ServerConfig, **overrides: Any) -> uvicorn.Config:
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=_guarded_protocol(settings.header_timeout),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout,
        ws_max_size=settings.max_request_bytes,
        ws_max_queue=max(settings.ws_max_pending, 1),
    )
    options.update(overrides)
    return uvicorn.Config(app, **options)
