"""Sessions and their messages.

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

from history.tables import LongJSON, LongText, TableNames, Timestamp

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade(suffix: str) -> None:
    names = TableNames.for_service(suffix)
    op.create_table(
        names.sessions,
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
    )
    op.create_index(f"ix_{names.sessions}_user_id", names.sessions, ["user_id"])
    op.create_index(f"ix_{names.sessions}_updated_at", names.sessions, ["updated_at"])
    op.create_table(
        names.messages,
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(255), sa.ForeignKey(f"{names.sessions}.id", ondelete="CASCADE"), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", LongText, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("trace_id", sa.String(64), nullable=True),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("details", LongJSON, nullable=True),
    )
    op.create_index(f"ix_{names.messages}_session_id", names.messages, ["session_id"])


def downgrade(suffix: str) -> None:
    names = TableNames.for_service(suffix)
    op.drop_table(names.messages)
    op.drop_table(names.sessions)
