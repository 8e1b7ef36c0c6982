"""`python -m dermanet.db upgrade | current | backup FILE` for the configured database
($DERMANET_DATABASE_URL, else the SQLite file in $DERMANET_DATA_DIR)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from dermanet.db.backup import BackupError, backup
from dermanet.db.cli import database_parser, one_line_error
from dermanet.db.config import database_url
from dermanet.db.engine import make_engine
from dermanet.db.migrate import current_revision, head_revision, upgrade


def main(argv: Sequence[str] | None = None) -> int:
    parser = database_parser("python -m dermanet.db", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("upgrade", help="apply the schema migrations (safe to repeat)")
    commands.add_parser("current", help="print the schema revision and the newest one")
    save = commands.add_parser("backup", help="an online copy, safe while serving")
    save.add_argument("path", help="file to write (SQLite file, or a pg_dump custom archive)")
    args = parser.parse_args(argv)
    url = database_url(args.url)
    try:
        if args.command == "backup":
            print(f"backup written to {backup(url, args.path)}")
            return 0
        engine = make_engine(url)
        shown = engine.url.render_as_string(hide_password=True)
        if args.command == "upgrade":
            print(f"{shown}: schema at {upgrade(engine)}")
        else:
            print(f"{shown}: schema at {current_revision(engine)}; newest {head_revision()}")
        return 0
    except (BackupError, SQLAlchemyError, OSError) as exc:
        return one_line_error(exc)


if __name__ == "__main__":
    sys.exit(main())
