"""Schema upgrades at start-up, through Alembic (never hand-written DDL)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def _config(connection: sa.Connection, suffix: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["suffix"] = suffix
    return config


def upgrade(engine: sa.Engine, suffix: str, revision: str = "head") -> None:
    """Bring this service's tables to `revision` (the newest by default); data is kept.

    On SQLite foreign keys are off while migrating: a revision that has to rebuild
    a table drops the old copy, and with them on that drop would delete every
    row that refers to it (the pragma only takes effect outside a transaction).
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                command.upgrade(_config(connection, suffix), revision)
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def current_revision(engine: sa.Engine, suffix: str) -> Optional[str]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": f"alembic_version_{suffix}"})
        return context.get_current_revision()


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()
