"""The model registry: a folder of `*.pt` checkpoints, each known by its file stem.

Ids from users are only ever matched against the folder's listing, never joined into a path,
so a request cannot name a file outside the registry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dermanet.answer import ModelVersion, created_at
from dermanet.inference.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    read_checkpoint_dict,
    stored_temperature,
)
from dermanet.inference.checkpoint import load_checkpoint as _load_checkpoint

log = logging.getLogger(__name__)

MODEL_DIR_ENV = "DERMANET_MODEL_DIR"
DEFAULT_MODEL_ENV = "DERMANET_DEFAULT_MODEL"
DEFAULT_MODEL_ID = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "weights"
CHECKPOINT_SUFFIX = ".pt"


class RegistryError(LookupError):
    """Base class of registry problems; messages say what to do."""


class UnknownModelError(RegistryError):
    """A model id that is not in the registry listing."""


class NoCheckpointsError(RegistryError):
    """The registry folder is missing or holds no checkpoint."""


class ModelUnavailableError(RegistryError):
    """A listed file that cannot be read as a DermaNet checkpoint."""


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one checkpoint without keeping its weights in memory."""

    model_id: str
    path: Path
    size_bytes: int
    modified_utc: str
    format_version: int | None = None
    img_size: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    error: str | None = None
    sha256: str = ""  # of the file's bytes when listed (a loaded model hashes what it loaded)
    created: str = ""  # the checkpoint's provenance.created_utc, else the file's mtime

    @property
    def version(self) -> ModelVersion:
        return ModelVersion(self.model_id, self.sha256, self.created)

    @property
    def usable(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view; the server-side path is left out on purpose."""
        return {
            "id": self.model_id,
            "sha256": self.sha256,
            "created": self.created,
            "file": self.path.name,
            "size_bytes": self.size_bytes,
            "modified_utc": self.modified_utc,
            "format_version": self.format_version,
            "img_size": self.img_size,
            "config": dict(self.config),
            "metrics": dict(self.metrics),
            "provenance": dict(self.provenance),
            "calibration_temperature": self.temperature,
            "usable": self.usable,
            "error": self.error,
        }


@dataclass(frozen=True)
class DefaultChoice:
    """The default model and why it was chosen (env, the `default` id, or the newest file)."""

    model_id: str
    reason: str


class ModelRegistry:
    """Lists, describes and loads the checkpoints of one folder."""

    def __init__(self, root: str | Path | None = None, default_model: str | None = None):
        env_root = os.environ.get(MODEL_DIR_ENV)
        self.root = Path(root or env_root or DEFAULT_MODEL_DIR).expanduser().resolve()
        self.default_model = default_model or os.environ.get(DEFAULT_MODEL_ENV) or None
        self._cache: dict[str, tuple[tuple[int, int], ModelInfo]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r})"

    def list(self) -> list[ModelInfo]:
        """Every `*.pt` in the folder, sorted by id; unreadable files carry an `error`."""
        if not self.root.is_dir():
            raise NoCheckpointsError(self._how_to_fix(f"model folder {self.root} does not exist"))
        infos = []
        with self._lock:
            seen = set()
            for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
                if not (entry.name.endswith(CHECKPOINT_SUFFIX) and entry.is_file()):
                    continue
                if entry.name.startswith("."):
                    continue
                stat = entry.stat()
                key = (stat.st_mtime_ns, stat.st_size)
                cached = self._cache.get(entry.name)
                if cached is None or cached[0] != key:
                    cached = (key, _describe(Path(entry.path), stat))
                    self._cache[entry.name] = cached
                seen.add(entry.name)
                infos.append(cached[1])
            for name in set(self._cache) - seen:
                del self._cache[name]
        return infos

    def ids(self) -> list[str]:
        return [info.model_id for info in self.list()]

    def get(self, model_id: str) -> ModelInfo:
        """The listing entry whose id equals `model_id` exactly; never a path lookup."""
        infos = self.list()
        for info in infos:
            if info.model_id == model_id:
                return info
        known = [info.model_id for info in infos]
        raise UnknownModelError(
            f"unknown model id {model_id!r}; the registry has {known} (GET /v1/models lists them)"
        )

    def resolve(self, model_id: str | None) -> ModelInfo:
        """A usable model: the given id, or the default when None/empty."""
        info = self.get(model_id) if model_id else self.get(self.default().model_id)
        if not info.usable:
            raise ModelUnavailableError(f"model {info.model_id!r} cannot be used: {info.error}")
        return info

    def default(self) -> DefaultChoice:
        """DERMANET_DEFAULT_MODEL (or the constructor's choice), else `default`, else newest."""
        infos = [info for info in self.list() if info.usable]
        if not infos:
            raise NoCheckpointsError(
                self._how_to_fix(f"model folder {self.root} has no usable *.pt checkpoint")
            )
        ids = {info.model_id for info in infos}
        if self.default_model:
            if self.default_model not in ids:
                raise UnknownModelError(
                    f"default model {self.default_model!r} (from {DEFAULT_MODEL_ENV} or settings) "
                    f"is not a usable checkpoint in {self.root}; available: {sorted(ids)}"
                )
            return DefaultChoice(self.default_model, f"set by {DEFAULT_MODEL_ENV} or settings")
        if DEFAULT_MODEL_ID in ids:
            return DefaultChoice(DEFAULT_MODEL_ID, f"the registry has a '{DEFAULT_MODEL_ID}' model")
        newest = max(infos, key=lambda info: (info.modified_utc, info.model_id))
        return DefaultChoice(newest.model_id, "the newest checkpoint in the registry")

    def load(self, model_id: str | None = None, map_location: str = "cpu") -> LoadedCheckpoint:
        """Load a model by id (None: the default)."""
        info = self.resolve(model_id)
        return _load_checkpoint(info.path, map_location=map_location)

    def _how_to_fix(self, problem: str) -> str:
        return (
            f"{problem}. Train one with jobs/train.py (it writes a checkpoint), copy a DermaNet "
            f".pt checkpoint there, or point {MODEL_DIR_ENV} at a folder of checkpoints."
        )


def _describe(path: Path, stat: os.stat_result) -> ModelInfo:
    """One file's listing entry: metadata, and its version (hashed once per file change)."""
    model_id = path.name[: -len(CHECKPOINT_SUFFIX)]
    base: dict[str, Any] = {
        "model_id": model_id,
        "path": path,
        "size_bytes": int(stat.st_size),
        "modified_utc": dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC).isoformat(
            timespec="milliseconds"
        ),
    }
    try:
        raw = path.read_bytes()
        base |= {
            "sha256": hashlib.sha256(raw).hexdigest(),
            "created": created_at(None, stat.st_mtime),
        }
        data = read_checkpoint_dict(path, mmap=True)
    except (CheckpointError, OSError) as exc:
        log.warning("registry: skipping %s: %s", path, exc)
        return ModelInfo(**base, error=str(exc))
    base["created"] = created_at((data.get("provenance") or {}).get("created_utc"), stat.st_mtime)
    config = dict(data["model_config"])
    summary = {k: config.get(k) for k in ("name", "layers", "widths", "act", "num_classes")}
    state = data["state_dict"]
    summary["parameters"] = sum(t.numel() for k, t in state.items() if "num_batches" not in k)
    return ModelInfo(
        **base,
        format_version=int(data["format_version"]),
        img_size=int(data["img_size"]),
        config=summary,
        metrics=dict(data.get("metrics") or {}),
        provenance=dict(data.get("provenance") or {}),
        temperature=stored_temperature(data),
    )
