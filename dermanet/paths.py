"""Where DermaNet finds things outside the package (the real sample data set)."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR_ENV = "DERMANET_SAMPLE_DIR"


def sample_dir() -> Path:
    """The derm-sample folder: $DERMANET_SAMPLE_DIR, else ../shared/data/derm-sample next to
    the project root. It may not exist (a user's fresh machine)."""
    configured = os.environ.get(SAMPLE_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return (PROJECT_ROOT / ".." / "shared" / "data" / "derm-sample").resolve()


def sample_available() -> bool:
    """True when derm-sample's metadata and images are both present."""
    root = sample_dir()
    return (root / "metadata.csv").is_file() and (root / "images").is_dir()
