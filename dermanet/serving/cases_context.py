"""What the cases routes and the key check need inside an Ingress replica: the database
sessions, the image folder and the replica's classify call. Set once per replica by
`configure`; module state, because the FastAPI app is a frozen copy in the replica."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dermanet.db.config import data_dir, database_url, images_dir
from dermanet.db.engine import session_factory
from dermanet.serving.uploads import ApiError

Classify = Callable[[Any], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class CasesContext:
    sessions: sessionmaker[Session]
    images_root: Path
    classify: Classify


_context: CasesContext | None = None


def configure(url: str | None, folder: str | None, classify: Classify) -> CasesContext:
    global _context
    _context = CasesContext(
        session_factory(database_url(url, folder)), images_dir(data_dir(folder)), classify
    )
    return _context


def current() -> CasesContext:
    if _context is None:
        raise ApiError(503, "the cases database is not configured in this server")
    return _context
