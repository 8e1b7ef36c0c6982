"""Accounts, roles and API keys (`python -m dermanet.accounts add|list|revoke`)."""

from dermanet.accounts.store import (
    AccountError,
    Principal,
    add_account,
    authenticate,
    list_accounts,
    revoke_account,
)

__all__ = [
    "AccountError",
    "Principal",
    "add_account",
    "authenticate",
    "list_accounts",
    "revoke_account",
]
