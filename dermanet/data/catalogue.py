"""The catalogue: one table describing a data set, whatever format it came in."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dermanet.classes import CLASS_INDEX, CLASS_NAMES
from dermanet.data.images import image_id_from_filename, index_image_folder

log = logging.getLogger(__name__)

CATALOGUE_COLUMNS: tuple[str, ...] = (
    "image",
    "path",
    "label",
    "lesion_id",
    "age_approx",
    "sex",
    "anatom_site",
    "split",
    "origin",  # where the image came from (e.g. HAM10000, ISIC_archive); None when unknown
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
MISSING_POLICIES = ("error", "drop")


class CatalogueError(ValueError):
    """A data set that cannot become a catalogue; the message names the offending rows."""


def describe_offenders(items: Sequence[object], limit: int = 5) -> str:
    """'3 (a, b, c)' or '120 (first 5: a, b, c, d, e)': count plus the first few."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    if len(items) <= limit:
        return f"{len(items)} ({shown})"
    return f"{len(items)} (first {limit}: {shown})"


def finalize_catalogue(
    table: pd.DataFrame,
    image_dir: str | Path,
    source: str,
    missing: str = "error",
) -> pd.DataFrame:
    """Validate a reader's table and resolve image paths: the shared tail of every reader.

    `table` needs `image` and `label` (ISIC 2019 class names) and may carry `lesion_id`,
    `age_approx`, `sex`, `anatom_site`, `split`, `origin`. With missing='drop', rows whose
    image file is absent are dropped and logged; with 'error' they raise.
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
    if table.empty:
        raise CatalogueError(f"{source}: the table has no rows")
    table = table.copy()
    # Some ISIC tables name files, e.g. `ISIC_0000017_downsampled`: the id is `ISIC_0000017`.
    table["image"] = [image_id_from_filename(str(i).strip()) for i in table["image"]]
    table["label"] = table["label"].astype(str).str.strip().str.upper()

    unknown = table.loc[~table["label"].isin(CLASS_NAMES)]
    if len(unknown):
        offenders = [f"{r.image}={r.label}" for r in unknown.itertuples()]
        raise CatalogueError(
            f"{source}: {describe_offenders(offenders)} rows have unknown labels; "
            f"valid labels are {', '.join(CLASS_NAMES)}"
        )
    duplicated = table.loc[table["image"].duplicated(keep=False), "image"].unique()
    if len(duplicated):
        raise CatalogueError(
            f"{source}: {describe_offenders(sorted(duplicated))} image ids appear more than once; "
            "each image must be listed exactly once"
        )

    files = index_image_folder(image_dir)
    table["path"] = table["image"].map(lambda i: str(files[i]) if i in files else None)
    absent = table.loc[table["path"].isna(), "image"].tolist()
    if absent:
        message = (
            f"{source}: {describe_offenders(absent)} images have no file (.jpg/.jpeg/.png, "
            f"optionally _downsampled) in {image_dir}"
        )
        if missing == "error":
            raise CatalogueError(
                message + "; fix the folder or pass missing='drop' (--drop-missing)"
            )
        log.warning("%s; dropped them", message)
        table = table.loc[table["path"].notna()]
    if table.empty:
        raise CatalogueError(f"{source}: no rows left after dropping images without files")

    table["lesion_id"] = _column_or(table, "lesion_id", None)
    table["lesion_id"] = table["lesion_id"].where(
        table["lesion_id"].notna() & (table["lesion_id"].astype(str).str.strip() != ""),
        table["image"],
    )
    table["lesion_id"] = table["lesion_id"].astype(str)
    table["age_approx"] = pd.to_numeric(_column_or(table, "age_approx", None), errors="coerce")
    for column in ("sex", "anatom_site", "origin"):
        table[column] = pd.Series(
            [_clean_text(v) for v in _column_or(table, column, None)],
            index=table.index,
            dtype=object,
        )
    table["split"] = _column_or(table, "split", None)
    return table.loc[:, list(CATALOGUE_COLUMNS)].reset_index(drop=True)


def _clean_text(value: object) -> str | None:
    """Blank, NaN and 'unknown' become None; other values stripped strings."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    text = str(value).strip()
    return None if text.lower() in ("", "nan", "unknown") else text


def _column_or(table: pd.DataFrame, column: str, default: object) -> pd.Series:
    if column in table.columns:
        return table[column]
    return pd.Series([default] * len(table), index=table.index, dtype=object)


def label_indices(catalogue: pd.DataFrame) -> pd.Series:
    """Integer class index per row, in the fixed CLASS_NAMES order."""
    return catalogue["label"].map(CLASS_INDEX).astype("int64")


def class_counts(catalogue: pd.DataFrame) -> pd.DataFrame:
    """Images per class and split (rows: classes in contract order; columns: splits)."""
    if catalogue["split"].isna().all():
        counts = catalogue.groupby("label").size().to_frame("all")
    else:
        counts = catalogue.groupby(["label", "split"]).size().unstack(fill_value=0)
        counts = counts.reindex(columns=[s for s in SPLITS if s in counts.columns])
    return counts.reindex(CLASS_NAMES, fill_value=0)
