"""Alembic environment: run by `history.migrate.upgrade` on a connection it passes in.

The table suffix comes in through `config.attributes["suffix"]`; the version
table carries it too, so each service sharing a database upgrades its own tables.
"""

from __future__ import annotations

import zlib

from alembic import context

config = context.config
connection = config.attributes["connection"]
suffix = config.attributes["suffix"]


def _lock(conn) -> None:
    """Instances starting together on one server database take turns; the later one finds the work done."""
    key = zlib.crc32(f"chatllm-history-{suffix}".encode())
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({key})")
    elif conn.dialect.name in ("mysql", "mariadb"):
        conn.exec_driver_sql(f"SELECT GET_LOCK('chatllm_history_{suffix}', 60)")


context.configure(connection=connection, version_table=f"alembic_version_{suffix}", render_as_batch=True)
with context.begin_transaction():
    _lock(connection)
    context.run_migrations(suffix=suffix)
