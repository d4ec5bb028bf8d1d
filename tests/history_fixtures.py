"""A server that keeps conversations, on a database URL of the test's choosing."""

from __future__ import annotations

from typing import Iterator

from chat import ChatService
from history import HistoryConfig, HistoryService
from tests.conftest import LiveServer, serve


def history_service(url: str, **settings) -> HistoryService:
    service = HistoryService(HistoryConfig(**settings), url, "test-model")
    service.start()
    return service


def serve_with_history(engine, knowledge, url: str, token=None, port=None, limits=None,
                       **settings) -> Iterator[tuple[LiveServer, HistoryService]]:
    history = history_service(url, **settings)
    chat = ChatService(engine, knowledge, limits, history=history)
    try:
        for live in serve(chat, token, knowledge=knowledge, port=port):
            yield live, history
    finally:
        chat.shutdown()
        history.shutdown()


def database_url(request, kind: str, tmp_path_factory) -> str:
    """A fresh conversation database of the given kind (sqlite, postgresql, mysql)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('history') / 'chat_history.db'}"
    if kind == "postgresql":
        return request.getfixturevalue("postgres").url
    return request.getfixturevalue("mariadb_url")
