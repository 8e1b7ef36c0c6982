"""Database fixtures (registered with `pytest_plugins`): a REAL PostgreSQL server started in a
temp folder for the session, and `db_url`, one fresh database per test on SQLite and on
PostgreSQL (skipped with the reason where PostgreSQL is not installed: `make test` installs
it on Debian)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from dermanet.serving.runner import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_databases = count()


def _pg_bin() -> Path | None:
    found = sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(Path(p).parent.name))
    if found and (Path(found[-1]) / "initdb").is_file():
        return Path(found[-1])
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _as_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL (unix socket in its own temp folder, own port, trust auth); yields
    the socket folder and port as a URL query for `postgresql+psycopg://postgres@/DB?...`."""
    binaries = _pg_bin()
    if binaries is None:
        pytest.skip("PostgreSQL not installed (Debian: apt-get install -y postgresql)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as postgres")
    folder = Path(tempfile.mkdtemp(prefix="drn-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    run = {"check": True, "capture_output": True, "text": True, "timeout": 120}
    try:
        subprocess.run(
            _as_owner([str(binaries / "initdb"), "-D", str(data), "-U", "postgres",
                       "--auth=trust", "--no-sync", "-E", "UTF8"]), **run
        )  # fmt: skip
        options = f"-c listen_addresses='' -c unix_socket_directories={folder} -p {port} -F"
        subprocess.run(
            _as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-w",
                       "-l", str(folder / "log"), "start"]), **run
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {exc.stderr or exc.stdout}")
    try:
        yield f"host={folder}&port={port}"
    finally:
        subprocess.run(
            _as_owner([str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False, capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(folder, ignore_errors=True)


def new_postgres_database(query: str) -> str:
    """A fresh, empty database on the session's server; its SQLAlchemy URL."""
    import psycopg

    name = f"dermanet_test_{os.getpid()}_{next(_databases)}"
    params = dict(part.split("=", 1) for part in query.split("&"))
    with psycopg.connect(
        dbname="postgres", user="postgres", host=params["host"], port=params["port"],
        autocommit=True,
    ) as connection:  # fmt: skip
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@/{name}?{query}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: an SQLite file, or a database on the private PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'dermanet.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))
