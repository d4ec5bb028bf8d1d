"""Conversations kept on the server: sessions, messages and traces in a relational database."""

from history.config import HistoryConfig
from history.repository import Exchange, HistoryRepository, SessionNotFound
from history.service import HistoryService, HistoryUnavailable
from history.tracing import Trace

__all__ = ["Exchange", "HistoryConfig", "HistoryRepository", "HistoryService", "HistoryUnavailable",
           "SessionNotFound", "Trace"]
