"""Lesion-grouped stratified splits and class weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermanet.classes import CLASS_NAMES
from dermanet.data import CatalogueError, assign_splits, class_counts, class_weights, read_plain_csv
from dermanet.data.pipelines import sampling_repeats


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


def test_sampling_repeats_rebalance_classes_and_sources() -> None:
    """Class power sets class shares; source power moves draws to the rare source inside each
    class without changing those shares; an epoch keeps its size."""
    # Class 0: 60 rows of source a, 20 of b. Class 1: 20 rows of a only. (a: 80 rows, b: 20.)
    table = pd.DataFrame(
        {"label_index": [0] * 80 + [1] * 20, "origin": ["a"] * 60 + ["b"] * 20 + ["a"] * 20},
        index=pd.Index(np.arange(100) + 1000, name="index"),
    )
    assert sampling_repeats(table, 0.0, 0.0) is None

    def shares(class_power: float, origin_power: float) -> tuple[pd.Series, pd.Series]:
        copies = pd.Series(sampling_repeats(table, class_power, origin_power))
        assert sorted(copies.index) == sorted(table.index)
        assert copies.sum() == pytest.approx(len(table))
        drawn = copies.reindex(table.index) / len(table)
        return drawn.groupby(table["label_index"]).sum(), drawn.groupby(table["origin"]).sum()

    classes, sources = shares(1.0, 0.0)  # balanced classes, sources as they come
    assert classes.tolist() == pytest.approx([0.5, 0.5])
    assert sources["b"] == pytest.approx(0.5 * 20 / 80)
    classes, sources = shares(0.5, 0.0)  # square root: 80 : 20 -> sqrt(80) : sqrt(20)
    assert classes[0] / classes[1] == pytest.approx(2.0)
    classes, sources = shares(1.0, 1.0)  # inside class 0, b's rows weigh 80/20 = 4x a's
    assert classes.tolist() == pytest.approx([0.5, 0.5])
    assert sources["b"] == pytest.approx(0.5 * (20 * 4) / (60 + 20 * 4))
    _, half = shares(1.0, 0.5)
    assert 0.5 * 20 / 80 < half["b"] < sources["b"]
    no_origin = table.drop(columns="origin")  # one source: the same as class power alone
    assert sampling_repeats(no_origin, 1.0, 1.0) == pytest.approx(sampling_repeats(table, 1.0, 0))
