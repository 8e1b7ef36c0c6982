"""One way from a data location to a split's rows, for every job (prepare, train, evaluate).

A location is prepared shards, or a catalogue CSV + image folder (split on the fly when the CSV
has no split column). `split_rows` returns the undecoded Ray Data rows of some splits together
with the table that says what each row is (image id, label, origin), keyed by the row `index`
that flows through the pipelines, so no job builds that contract by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import ray.data

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import SPLITS, CatalogueError, label_indices
from dermanet.data.readers import read_catalogue
from dermanet.data.splits import DEFAULT_FRACTIONS, assign_splits
from dermanet.settings import option

log = logging.getLogger(__name__)
DESCRIBING_COLUMNS = ("image", "origin")  # what split_rows reads from shards besides references


@dataclass(frozen=True)
class DataLocation:
    """Prepared shards, or a catalogue CSV (any supported format) with its image folder."""

    shards: str | None = None
    csv: str | None = None
    images: str | None = None
    drop_missing: bool = False
    split_seed: int = 0
    metadata_csv: str | None = None

    def describe(self) -> str:
        return f"shards {self.shards}" if self.shards else f"catalogue {self.csv}"


@dataclass
class DataSourceSettings:
    """Where a job's images come from, declared once: prepared shards, or a catalogue CSV +
    image folder. Mixed into the settings of every job that reads a split (training,
    evaluation, the similar-cases index), so their flags, rules and messages are the same."""

    shards: str | None = option(
        None, "prepared shards (jobs/prepare_data.py output; path or URI)", group="data"
    )
    csv: str | None = option(
        None, "catalogue CSV instead of shards (any supported format)", group="data"
    )
    images: str | None = option(None, "image folder for --csv", group="data")
    drop_missing: bool = option(False, "drop --csv rows without an image file", group="data")
    split_seed: int = option(0, "seed of the split when --csv has no split column", group="data")

    def check_source(self) -> None:
        """Exactly one source: --shards, or --csv with --images."""
        if (self.shards is None) == (self.csv is None):
            raise ValueError("give either --shards or --csv (with --images), not both or neither")
        if self.csv is not None and self.images is None:
            raise ValueError("--csv needs --images (the image folder)")

    @property
    def location(self) -> DataLocation:
        return DataLocation(
            shards=self.shards,
            csv=self.csv,
            images=self.images,
            drop_missing=self.drop_missing,
            split_seed=self.split_seed,
        )


def load_catalogue(
    location: DataLocation, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> pd.DataFrame:
    """Read the catalogue and split it (seeded, lesion-grouped) unless it carries valid splits."""
    if location.csv is None or location.images is None:
        raise ValueError("a catalogue needs --csv and --images")
    catalogue = read_catalogue(
        location.csv,
        location.images,
        metadata_csv=location.metadata_csv,
        missing="drop" if location.drop_missing else "error",
    )
    if catalogue["split"].isin(SPLITS).all():
        log.info("using the split column of %s", location.csv)
        return catalogue
    return assign_splits(catalogue, fractions, seed=location.split_seed)


@dataclass
class SplitRows:
    """Undecoded rows (a shard `file` and `row`, or `path` for catalogue files, read by the task
    that decodes them: see `pipelines.encoded_image`), `label_index`, `index`, and what each
    row is, by `index`."""

    dataset: ray.data.Dataset
    table: pd.DataFrame  # index -> image, label_index, origin (None when unknown)

    def counts(self) -> dict[str, int]:
        """Images per class name (absent classes are 0)."""
        counts = self.table["label_index"].value_counts()
        return {c: int(counts.get(i, 0)) for i, c in enumerate(CLASS_NAMES)}

    def __len__(self) -> int:
        return len(self.table)


def split_rows(
    location: DataLocation,
    splits: str | Sequence[str],
    *,
    origins: Sequence[str] | None = None,
    exclude_origins: Sequence[str] = (),
) -> SplitRows:
    """Rows of one or more splits (`"all"`: every split), optionally of some origins only.

    `origins` keeps only rows whose `origin` is listed, `exclude_origins` drops rows whose
    origin is listed: a leave-one-source-out study trains without a source and scores on it.
    """
    from dermanet.data.pipelines import (
        read_catalogue_files,
        shard_references_dataset,
        shard_rows,
    )

    names = list(SPLITS) if splits == "all" else [splits] if isinstance(splits, str) else splits
    unknown = sorted(set(names) - set(SPLITS))
    if unknown or not names:
        raise ValueError(f"splits must be some of {SPLITS} or 'all', got {list(names)}")
    if location.shards:
        per_split = [shard_rows(location.shards, split, DESCRIBING_COLUMNS) for split in names]
        table = shard_table = pd.concat(per_split, ignore_index=True)
        if "origin" not in table:
            table["origin"] = None
    else:
        table = catalogue_rows(load_catalogue(location))
        table = table.loc[table["split"].isin(names)]
    table = _filter_origins(table, origins, exclude_origins).set_index("index", drop=False)
    if table.empty:
        raise CatalogueError(
            f"{location.describe()}: no images in split(s) {names}"
            + (f" with origins {list(origins)}" if origins else "")
            + (f" without origins {list(exclude_origins)}" if exclude_origins else "")
        )
    filtered = bool(origins) or bool(exclude_origins)
    keep = set(table["index"].tolist()) if filtered else None
    if location.shards:  # one frame, so several splits stay one materialised dataset
        dataset = shard_references_dataset(shard_table, keep_index=keep)
    else:
        dataset = read_catalogue_files(table.reset_index(drop=True))
    columns = ["image", "label_index", "origin"]
    return SplitRows(dataset, table.loc[:, columns].rename_axis("index"))


def catalogue_rows(catalogue: pd.DataFrame) -> pd.DataFrame:
    """The catalogue with the pipeline's row contract: `index` (row id) and `label_index`.

    Prepared shards get the same two columns from `prepare_shards`; this is the in-memory twin
    for a catalogue read on the fly.
    """
    return catalogue.assign(
        index=np.arange(len(catalogue), dtype=np.int64), label_index=label_indices(catalogue)
    )


def require_origins(table: pd.DataFrame, what: str) -> None:
    """Stop with what to do when `what` (a flag) needs image origins the rows do not have."""
    if "origin" not in table or table["origin"].isna().all():
        raise CatalogueError(
            f"{what} needs an `origin` column in the catalogue: use a CSV that has one (e.g. "
            "derm-sample's metadata.csv), and re-run jobs/prepare_data.py on it for --shards"
        )


def _filter_origins(
    table: pd.DataFrame, origins: Sequence[str] | None, exclude: Sequence[str]
) -> pd.DataFrame:
    if origins or exclude:
        require_origins(table, "an origin filter (--origins, --exclude-origins)")
    if origins:
        table = table.loc[table["origin"].isin(list(origins))]
    if exclude:
        table = table.loc[~table["origin"].isin(list(exclude))]
    return table
