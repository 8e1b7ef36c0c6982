"""The prepare job's logic: catalogue source -> splits -> Parquet shards (jobs/prepare_data.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dermanet.data.shards import PrepareReport, prepare_shards
from dermanet.data.sources import DataLocation, load_catalogue
from dermanet.settings import check_settings, option

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSettings:
    """Everything `jobs/prepare_data.py` accepts (its flags are generated from these fields)."""

    csv: str = option(
        help="catalogue CSV: plain 'image,label[,lesion_id,...]', ISIC 2019 ground truth or "
        "HAM10000 metadata (detected from the header)",
        group="data",
    )
    images: str = option(help="folder with the images (searched recursively)", group="data")
    output: str = option(
        help="output folder or URI (s3://, gs://, file://) for shards", group="output"
    )
    metadata_csv: str | None = option(
        None, "ISIC 2019 metadata CSV (that format only)", group="data"
    )
    drop_missing: bool = option(
        False, "skip rows whose image file is missing (listed)", group="data"
    )
    limit: int | None = option(
        None, "keep only a random N images (quick experiments)", group="data", minimum=1
    )
    val_fraction: float = option(0.15, "share of images for val", group="split", minimum=0)
    test_fraction: float = option(0.15, "share of images for test", group="split", minimum=0)
    seed: int = option(0, "seed of the lesion-grouped split", group="split")
    short_side: int = option(
        256, "shrink images so the short side is this", group="output", minimum=1
    )
    jpeg_quality: int = option(
        90, "JPEG quality of stored images", group="output", minimum=1, maximum=100
    )
    rows_per_file: int = option(2048, "minimum rows per Parquet file", group="output", minimum=1)
    overwrite: bool = option(False, "replace shards already at --output", group="output")

    def validate(self) -> None:
        """Every flag within its declared range (the job checks before a Ray starts)."""
        check_settings(self)


def run_prepare(settings: PrepareSettings) -> PrepareReport:
    """Read the source, split it (unless the CSV already carries valid splits), write shards."""
    settings.validate()
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
