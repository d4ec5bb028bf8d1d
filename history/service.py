"""The conversation store as the server uses it: async, off the event loop, and never fatal to a chat.

Database work runs on a small thread pool of its own. On the chat path a
failing database means an answer without history (and `/health` says
degraded), not a failed answer; the history API answers 503 instead.
Writes are submitted, not awaited by the client's connection, so a client
that leaves mid-answer still gets its partial answer stored; shutdown waits
for the writes in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import sqlalchemy as sa

from history import migrate
from history.config import HistoryConfig
from history.repository import Exchange, HistoryRepository, SessionNotFound
from history.tracing import OtlpExporter, Trace
from metrics.counters import Tally

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how long a database error keeps /health degraded after the last failure
DEGRADED_SECONDS = 60.0
#: longest an answer's last event waits for its exchange to be written; the write itself goes on
RECORD_WAIT = 10.0
#: the errors that mean the database cannot be reached or used (not a bad value in one request)
OUTAGES = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DisconnectionError, sa.exc.TimeoutError)


class HistoryUnavailable(RuntimeError):
    """The database could not be reached or failed."""


def make_engine(url: str) -> sa.Engine:
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
        return engine
    # a database that does not answer must not hold answers for long (see RECORD_WAIT)
    backend = sa.engine.make_url(url).get_backend_name()
    connect_args = {"connect_timeout": 5} if backend in ("postgresql", "mysql", "mariadb") else {}
    if backend in ("mysql", "mariadb"):
        connect_args.update(read_timeout=30, write_timeout=30)
    return sa.create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8, pool_recycle=1800,
                            pool_timeout=10, connect_args=connect_args)


class HistoryService:
    def __init__(self, config: HistoryConfig, url: str, model_name: str = "") -> None:
        self.config = config
        self.url = url
        self.engine = make_engine(url)
        self.repo = HistoryRepository(self.engine, config.service_name, config.history_max_message_chars)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, config.history_threads), thread_name_prefix="history")
        self._pending: set[concurrent.futures.Future] = set()
        self._failed_at: Optional[float] = None
        self._last_error = ""
        self.counters = Tally()  # writes, failures, seconds: read by /metrics
        self.exporter = OtlpExporter(config.otlp_endpoint, config.service_name, model_name) if config.otlp_endpoint else None

    def start(self) -> None:
        """Upgrade the schema (at start-up, before serving) and apply retention once."""
        migrate.upgrade(self.engine, self.config.service_name)
        removed = self.repo.prune(self.config.history_max_age_days, self.config.history_max_sessions_per_user)
        if removed:
            log.info("retention removed %d old sessions", removed)

    # ---- running database work ---------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run repository work on the pool; a database failure becomes HistoryUnavailable."""
        future = self._pool.submit(fn, *args)
        try:
            result = await asyncio.wrap_future(future)
        except (SessionNotFound, LookupError, ValueError):
            raise
        except sa.exc.SQLAlchemyError as exc:
            self._failed(exc)
            raise HistoryUnavailable(f"the conversation database is unavailable: {type(exc).__name__}") from exc
        self._failed_at = None
        return result

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        """Fire-and-forget a write; failures are logged and mark the store degraded."""
        future = self._pool.submit(fn, *args)
        self._pending.add(future)

        def done(f: concurrent.futures.Future) -> None:
            self._pending.discard(f)
            exc = f.exception()
            if exc is not None and not isinstance(exc, SessionNotFound):
                self.counters.add("write_failures")
                self._failed(exc)
        future.add_done_callback(done)
        return future

    def _failed(self, exc: BaseException) -> None:
        if not isinstance(exc, OUTAGES):
            log.error("conversation database refused a write: %s", exc)
            return
        self._failed_at = time.monotonic()
        self._last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log.warning("conversation database error: %s", self._last_error)

    # ---- the chat path -----------------------------------------------------------------------

    async def turns_for(self, session_id: str, user_id: str, max_turns: int) -> Optional[list[tuple[str, str]]]:
        """Stored turns, or None when the database failed (the answer goes on without them)."""
        try:
            return await self.call(self.repo.recent_turns, session_id, user_id, max_turns)
        except HistoryUnavailable:
            return None

    async def record(self, exchange: Exchange, trace: Optional[Trace]) -> None:
        """Store an answered exchange and its trace; waits so a next turn on any instance sees it."""
        future = self.submit(self._write, exchange, trace)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), RECORD_WAIT)
        except SessionNotFound:
            raise
        except asyncio.TimeoutError:
            log.warning("the conversation database is slow: an answer went out before its exchange was stored")
        except Exception:
            pass  # logged, and /health says degraded

    def record_later(self, exchange: Exchange, trace: Optional[Trace]) -> None:
        """For an answer stopped by its client: nobody waits, the write still happens."""
        self.submit(self._write, exchange, trace)

    def _write(self, exchange: Exchange, trace: Optional[Trace]) -> None:
        began = time.monotonic()
        self.repo.add_exchange(exchange)
        if trace is not None:
            self.repo.add_trace(trace.as_dict(), exchange.session_id, exchange.user_id)
        self.counters.add("writes")
        self.counters.add("write_seconds", time.monotonic() - began)
        if self.exporter is not None:
            try:
                self.exporter.export(trace, exchange.session_id, exchange.user_id)
            except Exception:
                log.exception("exporting a trace over OTLP failed")

    # ---- health and shutdown -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.exporter.model if self.exporter is not None else ""

    @model_name.setter
    def model_name(self, name: str) -> None:
        """Known once the model has loaded (the database is opened first); exported traces carry it."""
        if self.exporter is not None:
            self.exporter.model = name

    @property
    def degraded(self) -> bool:
        return self._failed_at is not None and time.monotonic() - self._failed_at < DEGRADED_SECONDS

    def health(self) -> dict:
        out: dict[str, Any] = {"enabled": True, "database": sa.engine.make_url(self.url).render_as_string(hide_password=True),
                               "service_name": self.config.service_name, "status": "degraded" if self.degraded else "ok"}
        if self.degraded:
            out["error"] = self._last_error
        return out

    def shutdown(self) -> None:
        concurrent.futures.wait(list(self._pending), timeout=30)
        self._pool.shutdown(wait=True)
        if self.exporter is not None:
            self.exporter.shutdown()
        self.engine.dispose()
