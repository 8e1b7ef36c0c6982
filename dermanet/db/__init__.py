"""The clinic's database: cases, accounts and the audit trail (SQLAlchemy 2 + Alembic).

`python -m dermanet.db upgrade` applies the migrations; `python -m dermanet.db backup FILE`
copies a running database safely.
"""

from dermanet.db.config import data_dir, database_url, images_dir
from dermanet.db.engine import engine_for, make_engine, session_factory
from dermanet.db.migrate import SchemaOutdated, check_current, upgrade

__all__ = [
    "SchemaOutdated",
    "check_current",
    "data_dir",
    "database_url",
    "engine_for",
    "images_dir",
    "make_engine",
    "session_factory",
    "upgrade",
]
