"""The conversation tables, named with the service's suffix so several services can share one database.

Core tables rather than ORM classes: the names are only known at start-up.
The Alembic revisions in `migrations/` create exactly these; a change here
needs a new revision.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

# MySQL's TEXT stops at 64 KB; messages and traces can be longer
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql")
LongJSON = sa.JSON()
# MySQL's DATETIME drops fractions of a second unless asked: the order of sessions needs them
Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


@dataclass(frozen=True)
class TableNames:
    sessions: str
    messages: str
    traces: str
    versions: str

    @classmethod
    def for_service(cls, suffix: str) -> "TableNames":
        return cls(f"chat_session_{suffix}", f"chat_history_{suffix}", f"chat_trace_{suffix}", f"alembic_version_{suffix}")


class HistoryTables:
    def __init__(self, suffix: str) -> None:
        self.names = TableNames.for_service(suffix)
        self.metadata = sa.MetaData()
        self.sessions = sa.Table(
            self.names.sessions, self.metadata,
            sa.Column("id", sa.String(255), primary_key=True),
            sa.Column("user_id", sa.String(255), nullable=False, index=True),
            sa.Column("title", sa.String(200), nullable=False, default=""),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.Column("updated_at", Timestamp, nullable=False, index=True),
            sa.Column("pinned", sa.Boolean(), nullable=False, default=False),
        )
        self.messages = sa.Table(
            self.names.messages, self.metadata,
            sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
            sa.Column("session_id", sa.String(255), sa.ForeignKey(f"{self.names.sessions}.id", ondelete="CASCADE"),
                      nullable=False, index=True),
            sa.Column("role", sa.String(16), nullable=False),
            sa.Column("content", LongText, nullable=False),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.Column("trace_id", sa.String(64), nullable=True),
            sa.Column("finish_reason", sa.String(32), nullable=True),
            sa.Column("details", LongJSON, nullable=True),
        )
        self.traces = sa.Table(
            self.names.traces, self.metadata,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("session_id", sa.String(255), sa.ForeignKey(f"{self.names.sessions}.id", ondelete="CASCADE"),
                      nullable=True, index=True),
            sa.Column("user_id", sa.String(255), nullable=False),
            sa.Column("created_at", Timestamp, nullable=False),
            sa.Column("name", sa.String(64), nullable=False),
            sa.Column("spans", LongJSON, nullable=False),
        )
