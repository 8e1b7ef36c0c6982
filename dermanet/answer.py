"""The answer schema: what the server, batch inference and the dashboard say about an image.

One light module (no torch, no Ray) so the dashboard can parse answers without pulling in
the model stack. Every answer names the exact model file behind it (`ModelVersion`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelVersion:
    """Which checkpoint file answered: its registry id, the SHA-256 of its bytes as loaded, and
    when it was made (the checkpoint's own `provenance.created_utc`, or the file's mtime at
    load when the file records none)."""

    id: str
    sha256: str
    created: str

    @classmethod
    def of_bytes(
        cls, model_id: str, data: bytes, created: str | None, mtime: float | None = None
    ) -> ModelVersion:
        """The version of a checkpoint whose `data` were loaded. `created` is the file's own
        creation time (None when it records none); then the file's `mtime` (POSIX seconds),
        and for bytes without a file (a URI) the time they were loaded."""
        return cls(str(model_id), hashlib.sha256(data).hexdigest(), created_at(created, mtime))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, body: Mapping[str, Any] | None) -> ModelVersion | None:
        """Parse an answer's `model` object; None when the answer carries none."""
        if not body:
            return None
        return cls(str(body["id"]), str(body["sha256"]), str(body["created"]))


def created_at(recorded: Any, mtime: float | None) -> str:
    """A checkpoint's creation time: the one it records, else its file's mtime (POSIX
    seconds), else now (bytes without a file); ISO 8601, UTC."""
    if recorded:
        return str(recorded)
    when = dt.datetime.now(dt.UTC) if mtime is None else dt.datetime.fromtimestamp(mtime, dt.UTC)
    return when.isoformat(timespec="seconds")
