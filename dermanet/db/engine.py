"""Engines and sessions: SQLite tuned for a small server (WAL, foreign keys, busy timeout),
PostgreSQL through psycopg 3, the same models and migrations for both."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

BUSY_TIMEOUT_MS = 15_000  # a writer waits this long for another's transaction, then errors


def _sqlite_pragmas(connection: Any, _record: Any) -> None:
    """Per connection: WAL (readers never block the writer), foreign keys enforced (SQLite
    leaves them off), FULL sync (a committed answer survives a power cut, not only a crash)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    """BEGIN IMMEDIATE for every transaction: a writer takes the lock at the start, so two
    writers queue on the busy timeout instead of one failing with 'database is locked' when it
    upgrades a read lock."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for `url`; for SQLite the file's folder is created (mode 0o700)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not path.exists():  # private from the start: patients' cases live in it
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "isolation_level": None}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    try:
        return create_engine(url, pool_pre_ping=True)
    except ModuleNotFoundError as missing:  # the driver is an extra: SQLite needs nothing
        raise RuntimeError(
            f"{parsed.get_backend_name()} needs its driver ({missing.name}): "
            "pip install 'dermanet[postgres]'"
        ) from None


@functools.cache
def engine_for(url: str) -> Engine:
    """One engine (and connection pool) per URL and process."""
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"
