"""Lesion-grouped, label-stratified splits and class weights.

Several images can show one lesion (HAM10000): splitting by image would leak the same lesion into
validation and inflate scores, so whole lesions are assigned to one split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import SPLITS, CatalogueError

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def assign_splits(
    catalogue: pd.DataFrame,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> pd.DataFrame:
    """Return a copy with `split` in {train, val, test}, stratified by label, grouped by lesion.

    Per class, lesions are shuffled (seeded) and each split first receives one lesion, so that
    every class with at least three lesions appears in every split; the rest go greedily to the
    split furthest below its target image count. Same catalogue + seed -> same split.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers (train, val, test) summing to 1, "
            f"got {list(fractions)}"
        )
    lesions = (
        catalogue.groupby("lesion_id", sort=True)["label"]
        .agg(size="size", label=lambda s: s.value_counts().sort_index().idxmax())
        .reset_index()
    )
    rng = np.random.default_rng(seed)
    lesion_split: dict[str, str] = {}
    active = [i for i in np.argsort(fractions, kind="stable") if fractions[i] > 0]
    for label in CLASS_NAMES:
        group = lesions.loc[lesions["label"] == label]
        if group.empty:
            continue
        order = rng.permutation(len(group))
        ids = group["lesion_id"].to_numpy()[order]
        sizes = group["size"].to_numpy()[order]
        target = fractions * sizes.sum()
        current = np.zeros(3)
        if len(ids) < len(active):
            log.warning(
                "class %s has only %d lesion(s): it cannot appear in all %d splits",
                label,
                len(ids),
                len(active),
            )
        for k, (lesion, size) in enumerate(zip(ids, sizes, strict=True)):
            if k < len(active):
                choice = active[k]  # seed the smallest splits first
            else:
                deficit = np.where(fractions > 0, target - current, -np.inf)
                choice = int(np.argmax(deficit))
            lesion_split[lesion] = SPLITS[choice]
            current[choice] += size
    result = catalogue.copy()
    result["split"] = result["lesion_id"].map(lesion_split)
    return result


def class_weights(catalogue: pd.DataFrame, split: str | None = "train") -> np.ndarray:
    """Inverse-frequency weights N / (K * n_c) per class in CLASS_NAMES order (mean 1 if balanced).

    Raises when a class has no image in the split: its weight would be infinite, and a model
    trained without it cannot predict it.
    """
    rows = catalogue if split is None else catalogue.loc[catalogue["split"] == split]
    return class_weights_from_counts(rows["label"].value_counts().to_dict(), split or "whole")


def class_weights_from_counts(counts: dict[str, int], split: str = "train") -> np.ndarray:
    """`class_weights` from images per class (e.g. a shard manifest's counts)."""
    series = pd.Series(counts, dtype="int64").reindex(CLASS_NAMES, fill_value=0)
    absent = series.index[series.eq(0)].tolist()
    if absent:
        raise CatalogueError(
            f"classes {absent} have no images in the {split} split; add images or "
            "choose other split fractions"
        )
    return (series.sum() / (len(CLASS_NAMES) * series.to_numpy())).astype(np.float32)
