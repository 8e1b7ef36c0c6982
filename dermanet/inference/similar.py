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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermanet.classes import CLASS_INDEX, CLASS_NAMES
from dermanet.storage import atomic_write

INDEX_SUFFIX = ".index.parquet"
INDEX_FORMAT_VERSION = 1
METADATA_KEY = b"dermanet.index"


class IndexMismatchError(ValueError):
    """The index was built from another model file than the one it is used with."""


def index_path(model_path: str | Path) -> Path:
    """`weights/default.pt` -> `weights/default.index.parquet`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.stem + INDEX_SUFFIX)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
) -> Path:
    """Write an index: `table` has image, label (class name), lesion_id; one feature row each."""
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
        "format_version": INDEX_FORMAT_VERSION,
        "model_file": Path(model_path).name,
        "model_sha256": file_sha256(model_path),
        "rows": len(table),
        "feature_dim": int(features.shape[1]),
    }
    arrow = pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})
    return atomic_write(path, lambda handle: pq.write_table(arrow, handle, compression="zstd"))


def read_index_metadata(path: str | Path) -> dict[str, Any]:
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a DermaNet similar-cases index (no metadata)")
    return json.loads(raw)


@dataclass(frozen=True)
class Neighbour:
    image: str
    label: str
    distance: float  # cosine distance, 1 - cos: 0 identical, 2 opposite
    thumbnail: bytes | None

    def to_dict(self) -> dict[str, Any]:
        """The API shape; the thumbnail as base64 JPEG (or None when the index has none)."""
        import base64

        thumb = base64.b64encode(self.thumbnail).decode() if self.thumbnail else None
        return {"image": self.image, "label": self.label, "distance": self.distance,
                "thumbnail": thumb}  # fmt: skip


class SimilarityIndex:
    """Exact cosine nearest neighbours over an index file, checked against its model file."""

    def __init__(self, path: str | Path, model_path: str | Path | None = None):
        self.path = Path(path)
        self.metadata = read_index_metadata(self.path)
        if model_path is not None:
            expected = self.metadata.get("model_sha256")
            if expected != file_sha256(model_path):
                raise IndexMismatchError(
                    f"{self.path} was built from another model file than {model_path} "
                    f"(its {self.metadata.get('model_file')} had another SHA-256); rebuild it: "
                    f"python jobs/build_index.py --model {model_path}"
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
        query = normalise(np.atleast_2d(features))
        k = max(1, min(int(k), len(self)))
        similarity = query @ self.features.T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(-similarity, top, axis=1).argsort(axis=1)
        rows = np.take_along_axis(top, order, axis=1)
        return rows, 1.0 - np.take_along_axis(similarity, rows, axis=1)

    def neighbours(self, features: np.ndarray, k: int) -> list[Neighbour]:
        rows, distances = self.search(features, k)
        return [
            Neighbour(
                image=self.images[r],
                label=CLASS_NAMES[self.labels[r]],
                distance=float(d),
                thumbnail=self.thumbnails[r] if self.thumbnails else None,
            )
            for r, d in zip(rows[0], distances[0], strict=True)
        ]

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
