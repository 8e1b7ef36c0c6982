"""`python -m dermanet.accounts add NAME --role clinician|admin | list | revoke NAME`.

`add` prints the new key once, as its last line: store it now, it cannot be shown again.
Works on the configured database ($DERMANET_DATABASE_URL, else the SQLite file in
$DERMANET_DATA_DIR), which must be upgraded (`python -m dermanet.db upgrade`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from dermanet.accounts.store import AccountError, add_account, list_accounts, revoke_account
from dermanet.db.cli import database_parser, one_line_error
from dermanet.db.config import database_url
from dermanet.db.engine import make_engine, session_factory
from dermanet.db.migrate import SchemaOutdated, check_current
from dermanet.db.models import ROLES


def main(argv: Sequence[str] | None = None) -> int:
    parser = database_parser("python -m dermanet.accounts", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="a new account and its key (printed once, last line)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    commands.add_parser("list", help="accounts, roles and key counts (never keys)")
    revoke = commands.add_parser("revoke", help="revoke an account and all its keys")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    url = database_url(args.url)
    try:
        check_current(make_engine(url))
        with session_factory(url).begin() as session:
            if args.command == "add":
                account, key = add_account(session, args.name, args.role)
                print(f"account {account.name!r} ({account.role}) added; its key, shown once:")
                print(key)
            elif args.command == "revoke":
                account = revoke_account(session, args.name)
                print(f"account {account.name!r} revoked with all its keys")
            else:
                for row in list_accounts(session):
                    state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                    used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
                    print(
                        f"{row.name}\t{row.role}\t{state}\tkeys={row.active_keys}\tlast used {used}"
                    )
        return 0
    except (AccountError, SchemaOutdated, SQLAlchemyError) as exc:
        return one_line_error(exc)


if __name__ == "__main__":
    sys.exit(main())
