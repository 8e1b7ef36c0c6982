"""Accounts and keys on the real databases: the CLI shows a key once (last line), never again;
a wrong, malformed or revoked key finds nobody; only a salted hash is stored."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from dermanet.accounts import authenticate
from dermanet.accounts.__main__ import main as accounts_main
from dermanet.accounts.keys import hash_secret, new_key, parse_key
from dermanet.db import make_engine, session_factory, upgrade
from dermanet.db.models import ApiKey

pytest_plugins = ["conftest_db"]


def test_cli_add_list_revoke(db_url: str, capsys) -> None:
    assert accounts_main(["--url", db_url, "list"]) == 2  # not upgraded: says what to run
    assert "python -m dermanet.db upgrade" in capsys.readouterr().err
    upgrade(make_engine(db_url))
    assert accounts_main(["--url", db_url, "add", "dr.ann", "--role", "admin"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert parse_key(key) is not None
    assert accounts_main(["--url", db_url, "add", "dr.ann", "--role", "clinician"]) == 2
    assert "exists" in capsys.readouterr().err
    assert accounts_main(["--url", db_url, "add", "Ann Smith", "--role", "clinician"]) == 2
    capsys.readouterr()
    assert accounts_main(["--url", db_url, "list"]) == 0
    listing = capsys.readouterr().out
    assert "dr.ann\tadmin\tactive\tkeys=1" in listing and key not in listing
    sessions = session_factory(db_url)
    with sessions() as session:
        who = authenticate(session, key)
        assert who is not None and (who.name, who.role) == ("dr.ann", "admin")
        stored = session.scalars(select(ApiKey)).one()
        assert parse_key(key)[1] not in (stored.secret_hash, stored.salt)  # only a hash
        assert stored.last_used_at is not None
        key_id, secret = parse_key(key)
        wrong = ("B" if secret[0] == "A" else "A") + secret[1:]  # the first character: all bits
        assert authenticate(session, f"dn_{key_id}_{wrong}") is None
        assert authenticate(session, "Bearer " + key) is None  # malformed
        assert authenticate(session, "") is None
    assert accounts_main(["--url", db_url, "revoke", "dr.ann"]) == 0
    assert accounts_main(["--url", db_url, "revoke", "nobody"]) == 2
    with sessions() as session:
        assert authenticate(session, key) is None  # revoked


def test_keys_are_random_and_salted() -> None:
    first, second = new_key(), new_key()
    assert first.text != second.text and first.salt != second.salt
    assert hash_secret("same", first.salt) != hash_secret("same", second.salt)
    with pytest.raises(ValueError):
        hash_secret("x", "not hex")
