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
    """Bring this service's tables to `revision` (the newest by default); data is kept."""
    with engine.begin() as connection:
        command.upgrade(_config(connection, suffix), revision)


def current_revision(engine: sa.Engine, suffix: str) -> Optional[str]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": f"alembic_version_{suffix}"})
        return context.get_current_revision()


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()
