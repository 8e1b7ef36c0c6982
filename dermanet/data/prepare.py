"""The prepare job's logic: catalogue source -> splits -> Parquet shards (jobs/prepare_data.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dermanet.data.catalogue import SPLITS
from dermanet.data.readers import read_catalogue
from dermanet.data.shards import PrepareReport, prepare_shards
from dermanet.data.splits import assign_splits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSettings:
    """Everything `jobs/prepare_data.py` accepts, as one value."""

    csv: str
    images: str
    output: str
    metadata_csv: str | None = None
    drop_missing: bool = False
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    short_side: int = 256
    jpeg_quality: int = 90
    rows_per_file: int = 2048
    limit: int | None = None
    overwrite: bool = False


def run_prepare(settings: PrepareSettings) -> PrepareReport:
    """Read the source, split it (unless the CSV already carries valid splits), write shards."""
    catalogue = read_catalogue(
        settings.csv,
        settings.images,
        metadata_csv=settings.metadata_csv,
        missing="drop" if settings.drop_missing else "error",
    )
    log.info("catalogue: %d images from %s", len(catalogue), settings.csv)
    if catalogue["split"].isin(SPLITS).all():
        log.info("using the split column from %s", settings.csv)
    else:
        train = 1.0 - settings.val_fraction - settings.test_fraction
        catalogue = assign_splits(
            catalogue, (train, settings.val_fraction, settings.test_fraction), seed=settings.seed
        )
    if settings.limit is not None and settings.limit < len(catalogue):
        catalogue = catalogue.sample(n=settings.limit, random_state=settings.seed).sort_index()
        log.info("--limit: kept a random %d images", settings.limit)
    return prepare_shards(
        catalogue,
        settings.output,
        short_side=settings.short_side,
        jpeg_quality=settings.jpeg_quality,
        rows_per_file=settings.rows_per_file,
        overwrite=settings.overwrite,
    )
