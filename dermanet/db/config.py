"""Where the database and the stored images live: one data folder, one database URL.

Defaults need nothing installed: an SQLite file in the data folder. A clinic with a database
server sets `DERMANET_DATABASE_URL` (e.g. `postgresql+psycopg://user@host/dermanet`).
"""

from __future__ import annotations

import os
from pathlib import Path

from dermanet.paths import PROJECT_ROOT

DATA_DIR_ENV = "DERMANET_DATA_DIR"
DATABASE_URL_ENV = "DERMANET_DATABASE_URL"
DATABASE_FILE = "dermanet.db"
IMAGES_FOLDER = "images"


def data_dir(configured: str | Path | None = None) -> Path:
    """The data folder: the argument, else $DERMANET_DATA_DIR, else `data/` in the project."""
    chosen = configured or os.environ.get(DATA_DIR_ENV) or PROJECT_ROOT / "data"
    return Path(chosen).expanduser().resolve()


def database_url(configured: str | None = None, folder: str | Path | None = None) -> str:
    """The SQLAlchemy URL: the argument, else $DERMANET_DATABASE_URL, else an SQLite file in
    the data folder."""
    url = configured or os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    return f"sqlite:///{data_dir(folder) / DATABASE_FILE}"


def images_dir(folder: str | Path | None = None) -> Path:
    """Uploaded images, content-addressed by SHA-256 under the data folder."""
    return data_dir(folder) / IMAGES_FOLDER
