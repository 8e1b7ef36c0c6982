"""`python -m dermanet.db upgrade | current | backup FILE` for the configured database
($DERMANET_DATABASE_URL, else the SQLite file in $DERMANET_DATA_DIR)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy.exc import SQLAlchemyError

from dermanet.db.backup import BackupError, backup
from dermanet.db.config import database_url
from dermanet.db.engine import make_engine
from dermanet.db.migrate import current_revision, head_revision, upgrade


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dermanet.db", description=__doc__)
    parser.add_argument("--url", help="database URL (default: $DERMANET_DATABASE_URL or SQLite)")
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
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
