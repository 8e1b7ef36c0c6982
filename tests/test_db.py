"""The database layer on a real SQLite file and a real PostgreSQL server: migrations, the
constraints that keep the data sane, time zones, verbatim text and online backups."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, StatementError

from dermanet.db import SchemaOutdated, check_current, make_engine, session_factory, upgrade
from dermanet.db.__main__ import main as db_main
from dermanet.db.backup import BackupError, backup
from dermanet.db.migrate import current_revision, head_revision
from dermanet.db.models import Account, AuditEvent, Lesion, Patient

pytest_plugins = ["conftest_db"]


@pytest.fixture
def engine(db_url: str):
    engine = make_engine(db_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def test_upgrade_is_repeatable_and_checked(db_url: str) -> None:
    engine = make_engine(db_url)
    with pytest.raises(SchemaOutdated, match=r"python -m dermanet\.db upgrade"):
        check_current(engine)
    assert upgrade(engine) == head_revision()
    assert upgrade(engine) == head_revision()  # a second run changes nothing
    check_current(engine)
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_constraints_hold(engine) -> None:
    sessions = session_factory(str(engine.url.render_as_string(hide_password=False)))
    with sessions.begin() as session:
        session.add(Account(name="ann", role="clinician"))
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(Account(name="ann", role="admin"))  # names are unique
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(Account(name="eve", role="superuser"))  # roles are checked
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(Lesion(patient_id=999, pseudonym="L1", created_by=999))  # foreign keys on
    with sessions.begin() as session:
        ann = session.scalars(select(Account)).one()
        person = Patient(pseudonym="P-0001")
        session.add(person)
        session.flush()
        first = Lesion(patient_id=person.id, pseudonym="L1", created_by=ann.id)
        session.add(first)
    with pytest.raises(IntegrityError), sessions.begin() as session:
        session.add(Lesion(patient_id=person.id, pseudonym="L1", created_by=ann.id))
    with sessions.begin() as session:  # a deleted case no longer blocks a new one
        session.get(Lesion, first.id).deleted_at = datetime.now(UTC)
        session.flush()
        session.add(Lesion(patient_id=person.id, pseudonym="L1", created_by=ann.id))


def test_times_are_utc_and_text_is_verbatim(engine) -> None:
    sessions = session_factory(engine.url.render_as_string(hide_password=False))
    tricky = 'x\'); DROP TABLE accounts; -- ünïcödé \\ % _ "quoted"'
    local = datetime(2026, 3, 1, 9, 30, tzinfo=UTC).astimezone(datetime.now().astimezone().tzinfo)
    with sessions.begin() as session:
        session.add(AuditEvent(at=local, account="ann", action="test", detail={"note": tricky}))
    with sessions.begin() as session:
        event = session.scalars(select(AuditEvent)).one()
        assert event.at == datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
        assert event.at.tzinfo is not None
        assert event.detail == {"note": tricky}
        session.scalars(select(Account)).all()  # the table is still there
    with pytest.raises(StatementError, match="naive"), sessions.begin() as session:
        session.add(AuditEvent(at=datetime(2026, 1, 1), action="x"))


def test_sqlite_pragmas(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() >= 1000
    assert (tmp_path / "x.db").stat().st_mode & 0o077 == 0  # private file


def test_online_sqlite_backup_while_writing(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'live.db'}"
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(url)
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            with sessions.begin() as session:
                session.add(AuditEvent(action="write", detail={"n": n}))
            n += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert db_main(["--url", url, "backup", str(tmp_path / "copy.db")]) == 0
    finally:
        stop.set()
        thread.join()
    copy = sqlite3.connect(tmp_path / "copy.db")
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert copy.execute("SELECT count(*) FROM audit_events").fetchone()[0] >= 0
    assert copy.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0001"
    assert "backup written" in capsys.readouterr().out
    with pytest.raises(BackupError, match="no database file"):
        backup(f"sqlite:///{tmp_path / 'absent.db'}", tmp_path / "y.db")


def test_postgres_backup(postgres_server: str, tmp_path) -> None:
    from conftest_db import new_postgres_database

    url = new_postgres_database(postgres_server)
    upgrade(make_engine(url))
    if shutil.which("pg_dump") is None:
        with pytest.raises(BackupError, match="pg_dump is not on PATH"):
            backup(url, tmp_path / "pg.dump")
        return
    target = backup(url, tmp_path / "pg.dump")
    assert target.read_bytes().startswith(b"PGDMP")  # pg_dump's custom archive


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert db_main(["--url", f"sqlite:///{tmp_path}/none.db", "backup", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.startswith("error: no database file")
    assert db_main(["--url", f"sqlite:///{tmp_path}/new.db", "current"]) == 0
    assert "schema at None" in capsys.readouterr().out
