"""Accounts and their keys in the database: add (a key shown once), list, revoke, and find
the account a request's key belongs to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermanet.accounts.keys import new_key, parse_key, secret_matches
from dermanet.db.models import NAME_LENGTH, ROLES, Account, ApiKey, utcnow

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
LAST_USED_EVERY = timedelta(minutes=1)  # `last_used_at` is a hint: not one write per request


class AccountError(ValueError):
    """An account command that cannot be done (unknown name, name taken, bad role)."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    account_id: int
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class AccountRow:
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    active_keys: int
    last_used_at: datetime | None


def check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= NAME_LENGTH or not NAME_PATTERN.match(name):
        raise AccountError(
            f"account name {name!r}: 1-{NAME_LENGTH} characters, letters, digits and . _ @ - "
            "(a login name, not a person's full name)"
        )
    return name


def add_account(session: Session, name: str, role: str) -> tuple[Account, str]:
    """A new account with one key; returns the account and the key text (shown once)."""
    name = check_name(name)
    if role not in ROLES:
        raise AccountError(f"role {role!r}: use one of {', '.join(ROLES)}")
    if session.scalar(select(Account).where(Account.name == name)) is not None:
        raise AccountError(f"account {name!r} exists (revoke it, or choose another name)")
    account = Account(name=name, role=role)
    session.add(account)
    session.flush()
    return account, add_key(session, account)


def add_key(session: Session, account: Account) -> str:
    key = new_key()
    session.add(
        ApiKey(key_id=key.key_id, account_id=account.id, salt=key.salt, secret_hash=key.secret_hash)
    )
    return key.text


def find_account(session: Session, name: str) -> Account:
    account = session.scalar(select(Account).where(Account.name == name.strip()))
    if account is None:
        raise AccountError(f"no account named {name!r} (see `python -m dermanet.accounts list`)")
    return account


def revoke_account(session: Session, name: str) -> Account:
    """Revoke the account and every key of it (its past actions stay in the audit)."""
    account = find_account(session, name)
    now = utcnow()
    account.revoked_at = account.revoked_at or now
    for key in account.keys:
        key.revoked_at = key.revoked_at or now
    return account


def list_accounts(session: Session) -> list[AccountRow]:
    rows = []
    for account in session.scalars(select(Account).order_by(Account.name)):
        live = [k for k in account.keys if k.revoked_at is None]
        used = [k.last_used_at for k in account.keys if k.last_used_at is not None]
        rows.append(
            AccountRow(
                account.name,
                account.role,
                account.created_at,
                account.revoked_at,
                len(live),
                max(used, default=None),
            )
        )
    return rows


def authenticate(session: Session, key_text: str) -> Principal | None:
    """The live account a key belongs to, or None (malformed, unknown, wrong or revoked)."""
    parts = parse_key(key_text)
    if parts is None:
        return None
    key_id, secret = parts
    row = session.execute(
        select(ApiKey, Account).join(Account).where(ApiKey.key_id == key_id)
    ).one_or_none()
    if row is None:
        return None
    key, account = row
    if not secret_matches(secret, key.salt, key.secret_hash):
        return None
    if key.revoked_at is not None or account.revoked_at is not None:
        return None
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_EVERY:
        key.last_used_at = now
        session.commit()
    return Principal(account.id, account.name, account.role)
