"""Pinned sessions and the trace of every answer.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

from history.tables import LongJSON, TableNames, Timestamp

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade(suffix: str) -> None:
    names = TableNames.for_service(suffix)
    # a plain ADD COLUMN on every database: SQLite's batch mode would copy the table, and dropping
    # the old copy would cascade to the messages
    op.add_column(names.sessions, sa.Column("pinned", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        names.traces,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("session_id", sa.String(255), sa.ForeignKey(f"{names.sessions}.id", ondelete="CASCADE"), nullable=True),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("spans", LongJSON, nullable=False),
    )
    op.create_index(f"ix_{names.traces}_session_id", names.traces, ["session_id"])


def downgrade(suffix: str) -> None:
    names = TableNames.for_service(suffix)
    op.drop_table(names.traces)
    with op.batch_alter_table(names.sessions) as batch:
        batch.drop_column("pinned")
