"""Settings of the conversation store; `webui/cli.py` turns these fields into flags."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

_SERVICE_NAME = re.compile(r"[a-z0-9_]{1,40}")


@dataclass
class HistoryConfig:
    history: bool = field(
        default=True,
        metadata={"help": "keep conversations on the server (--no-history: every request stands alone, "
                          "as before sessions existed)"},
    )
    history_db: Optional[str] = field(
        default=None,
        metadata={"help": "SQLAlchemy URL of the conversation database, e.g. postgresql+psycopg://user:pw@host/db "
                          "or mysql+pymysql://user:pw@host/db; default: SQLite chat_history.db in --data-dir"},
    )
    service_name: str = field(
        default="chatllm",
        metadata={"help": "suffix of the table names (chat_session_<name>, chat_history_<name>, ...), so several "
                          "services can share one database; lower-case letters, digits and _"},
    )
    history_max_age_days: float = field(
        default=365.0, metadata={"help": "sessions not updated for this many days are deleted (0: keep forever)"},
    )
    history_max_sessions_per_user: int = field(
        default=1000, metadata={"help": "most sessions kept per user; the oldest unpinned ones go first (0: no cap)"},
    )
    history_max_message_chars: int = field(
        default=200_000,
        metadata={"help": "longest message stored, in characters; longer ones are stored cut, marked truncated"},
    )
    history_threads: int = field(
        default=4, metadata={"help": "threads doing database work, so the event loop never waits on the database"},
    )
    otlp_endpoint: Optional[str] = field(
        default=None,
        metadata={"help": "also export every trace over OTLP/HTTP to this URL (e.g. http://localhost:4318/v1/traces) "
                          "with the OpenTelemetry GenAI conventions"},
    )

    def __post_init__(self) -> None:
        if not _SERVICE_NAME.fullmatch(self.service_name):
            raise ValueError(f"--service-name {self.service_name!r}: use 1-40 lower-case letters, digits or _")

    def database_url(self, data_dir: str) -> str:
        if self.history_db:
            return self.history_db
        folder = Path(data_dir).resolve()
        return f"sqlite:///{folder / 'chat_history.db'}"
