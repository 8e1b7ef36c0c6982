"""Similar confirmed cases: an exact nearest-neighbour index of a model's training features.

A dermatologist judges a prediction better beside the closest confirmed cases than from a bare
percentage (Tschandl et al., BJD 2019: k-NN on CNN features matched the softmax). The index is
one Parquet file beside its model in the registry, `<model id>.index.parquet`, holding per
training image: id, diagnosis, lesion id, the model's pooled feature (L2-normalised, float16)
and optionally a small JPEG thumbnail. Its metadata records the SHA-256 of the exact model
file it was built from; any other model file is refused.

Search is exact (one matrix product): ~10k x 256 float32 is a few milliseconds. At millions of
rows use FAISS (faiss-cpu) or a vector database instead of this class; no home-made
approximate index.

Serving keeps one `IndexCache` per replica: each model's index is loaded once and reloaded
only when the model file or the index file changes; a missing index is an `IndexMissingError`
and a stale one an `IndexMismatchError`, both saying the exact command that (re)builds it.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shlex
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermanet.classes import CLASS_INDEX, CLASS_NAMES
from dermanet.storage import atomic_write, file_sha256

INDEX_SUFFIX = ".index.parquet"
INDEX_FORMAT_VERSION = 1
METADATA_KEY = b"dermanet.index"


DATA_PLACEHOLDER = "--shards DIR"  # when the model file does not say what it was trained on
MAX_K = 64  # neighbours one request may ask for


class IndexMismatchError(ValueError):
    """The index was built from another model file than the one it is used with."""


class IndexMissingError(FileNotFoundError):
    """The model has no index file beside it."""


def build_command(model_path: str | Path, provenance: Mapping[str, Any] | None = None) -> str:
    """The exact `jobs/build_index.py` command for a model: its training data is taken from the
    checkpoint's provenance (`settings.shards`, or `settings.csv` + `settings.images`)."""
    settings = dict((provenance or {}).get("settings") or {})
    if settings.get("shards"):
        data = f"--shards {shlex.quote(str(settings['shards']))}"
    elif settings.get("csv") and settings.get("images"):
        data = (
            f"--csv {shlex.quote(str(settings['csv']))} "
            f"--images {shlex.quote(str(settings['images']))}"
        )
    else:
        data = f"{DATA_PLACEHOLDER} (the model's training data: prepared shards, or --csv CSV "
        data += "--images DIR)"
    return f"python jobs/build_index.py --model {shlex.quote(str(model_path))} {data}"


def index_path(model_path: str | Path) -> Path:
    """`weights/default.pt` -> `weights/default.index.parquet`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + INDEX_SUFFIX)


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity becomes a dot product)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=-1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def write_index(
    path: str | Path,
    model_path: str | Path,
    table: pd.DataFrame,
    features: np.ndarray,
    thumbnails: Sequence[bytes | None] | None = None,
    *,
    model_sha256: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write an index: `table` has image, label (class name), lesion_id; one feature row each.

    `model_sha256` saves hashing the model file again when the caller has its bytes; `extra`
    (plain JSON values: split, data, thumbnail size, ...) is kept in the metadata.
    """
    features = normalise(features)
    if len(features) != len(table):
        raise ValueError(f"{len(features)} feature rows for {len(table)} images")
    unknown = sorted(set(table["label"]) - set(CLASS_NAMES))
    if unknown:
        raise ValueError(f"unknown labels {unknown}; the index holds confirmed ISIC classes only")
    columns = {
        "image": pa.array(table["image"].astype(str).tolist()),
        "label": pa.array(table["label"].astype(str).tolist()),
        "lesion_id": pa.array(table["lesion_id"].astype(str).tolist()),
        "feature": pa.FixedSizeListArray.from_arrays(
            pa.array(features.astype(np.float16).ravel()), features.shape[1]
        ),
    }
    if thumbnails is not None:
        columns["thumbnail"] = pa.array(list(thumbnails), type=pa.binary())
    metadata = {
        **dict(extra or {}),
        "format_version": INDEX_FORMAT_VERSION,
        "model_file": Path(model_path).name,
        "model_sha256": model_sha256 or file_sha256(model_path),
        "rows": len(table),
        "feature_dim": int(features.shape[1]),
        "built_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    arrow = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})
    return atomic_write(path, lambda handle: pq.write_table(arrow, handle, compression="zstd"))


def read_index_metadata(path: str | Path) -> dict[str, Any]:
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a DermaNet similar-cases index (no metadata)")
    return json.loads(raw)


def exact_search(
    catalogue: np.ndarray, features: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k rows of `catalogue` (unit rows, (N, D)) nearest each query by cosine: (row
    indices (M, k), distances 1 - cos (M, k)), nearest first. One matrix product."""
    query = normalise(np.atleast_2d(features))
    k = max(1, min(int(k), len(catalogue)))
    similarity = query @ catalogue.T
    top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-similarity, top, axis=1).argsort(axis=1)
    rows = np.take_along_axis(top, order, axis=1)
    return rows, 1.0 - np.take_along_axis(similarity, rows, axis=1)


@dataclass(frozen=True)
class Neighbour:
    image: str
    label: str
    distance: float  # cosine distance, 1 - cos: 0 identical, 2 opposite
    thumbnail: bytes | None

    def to_dict(self) -> dict[str, Any]:
        """The API shape; the thumbnail as base64 JPEG (or None when the index has none)."""
        thumb = base64.b64encode(self.thumbnail).decode() if self.thumbnail else None
        return {"image": self.image, "label": self.label, "distance": self.distance,
                "thumbnail": thumb}  # fmt: skip


@dataclass(frozen=True)
class SimilarCases:
    """The k nearest confirmed cases of one image and the class vote they cast."""

    neighbours: list[Neighbour]
    knn_probabilities: dict[str, float]
    balanced: bool = True

    @property
    def top_class(self) -> str:
        return max(self.knn_probabilities, key=self.knn_probabilities.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": len(self.neighbours),
            "vote": "class-balanced" if self.balanced else "majority",
            "neighbours": [n.to_dict() for n in self.neighbours],
            "knn_probabilities": dict(self.knn_probabilities),
            "knn_top_class": self.top_class,
        }


class SimilarityIndex:
    """Exact cosine nearest neighbours over an index file, checked against its model file."""

    def __init__(
        self,
        path: str | Path,
        model_path: str | Path | None = None,
        provenance: Mapping[str, Any] | None = None,
    ):
        """`model_path`: refuse the index unless it was built from exactly this file;
        `provenance` (the checkpoint's) names the training data in the rebuild command."""
        self.path = Path(path)
        self.metadata = read_index_metadata(self.path)
        if model_path is not None:
            expected = self.metadata.get("model_sha256")
            if expected != file_sha256(model_path):
                raise IndexMismatchError(
                    f"{self.path.name} was built from another model file than {model_path} "
                    f"(its {self.metadata.get('model_file')} had another SHA-256); rebuild it: "
                    f"{build_command(model_path, provenance)}"
                )
        table = pq.read_table(self.path)
        self.images = table["image"].to_pylist()
        self.labels = np.array([CLASS_INDEX[c] for c in table["label"].to_pylist()])
        self.lesions = table["lesion_id"].to_pylist()
        dim = int(self.metadata["feature_dim"])
        flat = table["feature"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
        self.features = normalise(flat.astype(np.float32).reshape(-1, dim))
        self.thumbnails = (
            table["thumbnail"].to_pylist() if "thumbnail" in table.column_names else None
        )
        counts = np.bincount(self.labels, minlength=len(CLASS_NAMES)).astype(np.float64)
        self.class_prior = counts / counts.sum()

    def __len__(self) -> int:
        return len(self.images)

    def search(self, features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices (M, k), cosine distances (M, k)), nearest first."""
        return exact_search(self.features, features, k)

    def neighbours(self, features: np.ndarray, k: int) -> list[Neighbour]:
        rows, distances = self.search(features, k)
        return self._neighbours(rows[0], distances[0])

    def _neighbours(self, rows: np.ndarray, distances: np.ndarray) -> list[Neighbour]:
        return [
            Neighbour(
                image=self.images[r],
                label=CLASS_NAMES[self.labels[r]],
                distance=float(d),
                thumbnail=self.thumbnails[r] if self.thumbnails else None,
            )
            for r, d in zip(rows, distances, strict=True)
        ]

    def similar(self, features: np.ndarray, k: int, balanced: bool = True) -> SimilarCases:
        """One query image's k nearest confirmed cases and their vote (the API answer)."""
        rows, distances = self.search(np.atleast_2d(features)[:1], k)
        votes = self.vote(rows, balanced=balanced)[0]
        return SimilarCases(
            neighbours=self._neighbours(rows[0], distances[0]),
            knn_probabilities={c: float(p) for c, p in zip(CLASS_NAMES, votes, strict=True)},
            balanced=balanced,
        )

    def vote(self, rows: np.ndarray, balanced: bool = True) -> np.ndarray:
        """k-NN class probabilities (M, K) from neighbour rows (M, k).

        balanced=True divides each class's votes by its share of the index, so the vote is not
        just the majority class (NV is two thirds of the training images); then renormalises.
        """
        votes = np.zeros((len(rows), len(CLASS_NAMES)))
        for i, members in enumerate(rows):
            np.add.at(votes[i], self.labels[members], 1.0)
        if balanced:
            votes = votes / np.maximum(self.class_prior, 1e-12)
        return votes / np.maximum(votes.sum(axis=1, keepdims=True), 1e-12)


class IndexUnreadableError(ValueError):
    """An index file that exists but cannot be read as an index."""


class IndexCache:
    """Each model's index, loaded once and kept while neither file changes (thread-safe).

    A replica serves several models: entries are keyed by model file, the least recently used
    one is dropped beyond `max_entries`. A file that changed on disk (a rebuilt index, a new
    model) is re-read; a missing index is looked for again on every call (an `os.stat`), so a
    freshly built one is picked up without a restart.
    """

    def __init__(self, max_entries: int = 3):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[tuple, SimilarityIndex | Exception]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, model_path: str | Path, provenance: Mapping[str, Any] | None = None
    ) -> SimilarityIndex:
        """The model's index; IndexMissingError, IndexMismatchError or IndexUnreadableError
        (each saying the command that builds a fitting one) otherwise."""
        model_path = Path(model_path)
        path = index_path(model_path)
        try:
            index_stat = os.stat(path)
        except FileNotFoundError:
            raise IndexMissingError(
                f"model {model_path.stem!r} has no similar-cases index ({path.name} beside the "
                f"model); build one: {build_command(model_path, provenance)}"
            ) from None
        model_stat = os.stat(model_path)
        key = tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in (model_stat, index_stat))
        with self._lock:
            cached = self._entries.get(str(model_path))
            if cached is not None and cached[0] == key:
                self._entries.move_to_end(str(model_path))
                value = cached[1]
            else:
                value = _load(path, model_path, provenance)
                self._entries[str(model_path)] = (key, value)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        if isinstance(value, Exception):
            raise value
        return value


def _load(
    path: Path, model_path: Path, provenance: Mapping[str, Any] | None
) -> SimilarityIndex | Exception:
    """The index, or the error that says why it cannot serve this model (kept in the cache, so
    a stale index is not re-hashed on every request)."""
    try:
        return SimilarityIndex(path, model_path, provenance)
    except IndexMismatchError as exc:
        return exc
    except (ValueError, KeyError, OSError, pa.ArrowException) as exc:
        return IndexUnreadableError(
            f"{path.name} cannot be read as a similar-cases index ({exc}); rebuild it: "
            f"{build_command(model_path, provenance)}"
        )
