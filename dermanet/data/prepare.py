"""The prepare job's logic: catalogue source -> splits -> Parquet shards (jobs/prepare_data.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dermanet.data.shards import PrepareReport, prepare_shards
from dermanet.data.sources import DataLocation, load_catalogue

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
    train = 1.0 - settings.val_fraction - settings.test_fraction
    location = DataLocation(
        csv=settings.csv,
        images=settings.images,
        metadata_csv=settings.metadata_csv,
        drop_missing=settings.drop_missing,
        split_seed=settings.seed,
    )
    catalogue = load_catalogue(location, (train, settings.val_fraction, settings.test_fraction))
    log.info("catalogue: %d images from %s", len(catalogue), settings.csv)
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
        seed=settings.seed,
    )
