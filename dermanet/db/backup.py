"""Online backups, safe while the server writes: SQLite's backup API copies a consistent
snapshot page by page; PostgreSQL's own `pg_dump` does the same for a server."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url


class BackupError(RuntimeError):
    """The backup could not be made; the message says why and what to do."""


def backup(url: str, target: str | Path) -> Path:
    """Write a consistent copy of the database at `url` to `target` (replaced atomically);
    SQLite gives an SQLite file, PostgreSQL a `pg_dump --format=custom` archive."""
    target = Path(target).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_backup(Path(parsed.database or ""), target)
    if backend == "postgresql":
        return _pg_dump(parsed.set(drivername="postgresql"), target)
    raise BackupError(f"no backup method for {backend!r} databases (SQLite and PostgreSQL only)")


def _sqlite_backup(source: Path, target: Path) -> Path:
    if not source.is_file():
        raise BackupError(f"no database file at {source}")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as src:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
                # the copy is standalone: no WAL beside it, so one file is the whole backup
                dst.execute("PRAGMA journal_mode=DELETE")
            finally:
                dst.close()
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _pg_dump(url, target: Path) -> Path:
    tool = shutil.which("pg_dump")
    if tool is None:
        raise BackupError(
            "pg_dump is not on PATH: install the PostgreSQL client (Debian: apt-get install "
            "postgresql-client, matching the server's major version) and run the backup again"
        )
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    command = [tool, "--format=custom", f"--file={target}", "--no-password"]
    for flag, value in (("--host", url.host), ("--port", url.port), ("--username", url.username)):
        if value:
            command.append(f"{flag}={value}")
    for flag, name, given in (("--host", "host", url.host), ("--port", "port", url.port)):
        value = url.query.get(name)  # a socket folder and its port given as ?host=/path&port=N
        if value and not given:
            command.append(f"{flag}={value}")
    command.append(str(url.database))
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BackupError(f"pg_dump failed ({result.returncode}): {result.stderr.strip()}")
    return target
