"""What the database command lines (`python -m dermanet.db`, `python -m dermanet.accounts`)
share: the `--url` option and their answer to an error, one line and exit status 2."""

from __future__ import annotations

import argparse
import sys


def database_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser with `--url`; the first line of `doc` describes it, the rest is its epilog."""
    first, _, rest = doc.partition("\n")
    parser = argparse.ArgumentParser(
        prog=prog,
        description=first,
        epilog=rest.strip() or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", help="database URL (default: $DERMANET_DATABASE_URL or SQLite)")
    return parser


def one_line_error(error: BaseException) -> int:
    """Print the error's first line (never a traceback) and return the exit status 2."""
    print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
          file=sys.stderr)  # fmt: skip
    return 2
