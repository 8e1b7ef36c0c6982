"""Lesion-grouped stratified splits and class weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermanet.classes import CLASS_NAMES
from dermanet.data import CatalogueError, assign_splits, class_counts, class_weights, read_plain_csv


def _check_split_invariants(cat: pd.DataFrame) -> None:
    assert set(cat["split"]) == {"train", "val", "test"}
    splits_per_lesion = cat.groupby("lesion_id")["split"].nunique()
    assert (splits_per_lesion == 1).all(), "a lesion appears in two splits"
    per_class = cat.groupby("label")["split"].nunique().reindex(CLASS_NAMES)
    assert (per_class == 3).all(), f"a class is missing from a split: {per_class.to_dict()}"


def test_synthetic_split_is_grouped_stratified_and_seeded(synthetic_dir: Path) -> None:
    cat = read_plain_csv(synthetic_dir / "metadata.csv", synthetic_dir / "images")
    first = assign_splits(cat, seed=3)
    _check_split_invariants(first)
    assert first["split"].tolist() == assign_splits(cat, seed=3)["split"].tolist()
    assert first["split"].tolist() != assign_splits(cat, seed=4)["split"].tolist()


def test_fractions_are_validated(synthetic_dir: Path) -> None:
    cat = read_plain_csv(synthetic_dir / "metadata.csv", synthetic_dir / "images")
    with pytest.raises(ValueError, match="summing to 1"):
        assign_splits(cat, fractions=(0.5, 0.2, 0.2))


def test_class_weights_inverse_frequency() -> None:
    labels = ["NV"] * 6 + ["MEL"] * 2 + ["AK", "BCC", "BKL", "DF", "SCC", "VASC"]
    cat = pd.DataFrame({"label": labels, "split": "train"})
    weights = class_weights(cat)
    n, k = len(labels), len(CLASS_NAMES)
    expected = {"NV": n / (k * 6), "MEL": n / (k * 2), "AK": n / k}
    for name, value in expected.items():
        assert weights[CLASS_NAMES.index(name)] == pytest.approx(value)
    with pytest.raises(CatalogueError, match=r"classes \['VASC'\] have no images in the train"):
        class_weights(cat.iloc[:-1])


@pytest.mark.sample
def test_derm_sample_split(derm_sample_catalogue: pd.DataFrame) -> None:
    cat = assign_splits(derm_sample_catalogue, seed=0)
    _check_split_invariants(cat)
    again = assign_splits(derm_sample_catalogue, seed=0)
    assert cat["split"].tolist() == again["split"].tolist()
    sizes = cat["split"].value_counts()
    fractions = sizes / len(cat)
    assert fractions["train"] == pytest.approx(0.70, abs=0.01)
    assert fractions["val"] == pytest.approx(0.15, abs=0.01)
    counts = class_counts(cat)
    print(f"\nderm-sample split sizes: {sizes.to_dict()}\n{counts.to_string()}")
    # Per class the split shares stay near the targets, not only overall.
    shares = counts.div(counts.sum(axis=1), axis=0)
    assert np.allclose(shares["train"], 0.70, atol=0.05)
    weights = class_weights(cat)
    assert weights[CLASS_NAMES.index("DF")] > weights[CLASS_NAMES.index("NV")] * 50
