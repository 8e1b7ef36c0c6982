"""Schema migrations (Alembic, shipped in the package): apply them, and say whether a
database is current, without an alembic.ini."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Bring the database to `revision` (default: the newest); returns the revision now."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return str(current_revision(engine))


class SchemaOutdated(RuntimeError):
    """The database is not at the schema this code needs."""


def check_current(engine: Engine) -> None:
    """Raise SchemaOutdated, with the command that fixes it, unless the database is at head."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        raise SchemaOutdated(
            f"database {where} is at schema {current or 'none (empty)'}, this DermaNet needs "
            f"{head}: run `python -m dermanet.db upgrade` (back it up first: "
            "`python -m dermanet.db backup FILE`)"
        )
