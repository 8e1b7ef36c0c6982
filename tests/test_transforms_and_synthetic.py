"""Transforms produce normalised CHW float32 at any size; synthetic data says what it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermanet.classes import CLASS_NAMES
from dermanet.data.images import read_image
from dermanet.data.synthetic import SYNTHETIC_PREFIX, draw_lesion, main
from dermanet.data.transforms import DERM_MEAN, eval_transform, to_model_input, train_transform


@pytest.mark.parametrize("size", [32, 96, 224])
def test_transforms_shape_and_range(size: int) -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((150, 200, 3)) * 255).astype(np.uint8)
    for transform in (train_transform(size), eval_transform(size)):
        out = to_model_input(transform, image)
        assert out.shape == (3, size, size) and out.dtype == np.float32
        assert out.min() > -6 and out.max() < 6


def test_eval_transform_is_deterministic_and_train_is_random() -> None:
    image = (np.random.default_rng(1).random((100, 120, 3)) * 255).astype(np.uint8)
    ev = eval_transform(64)
    np.testing.assert_array_equal(to_model_input(ev, image), to_model_input(ev, image))
    tr = train_transform(64)
    assert not np.array_equal(to_model_input(tr, image), to_model_input(tr, image))


def test_eval_normalisation_uses_dermoscopy_statistics() -> None:
    mean_colour = np.array(DERM_MEAN) * 255
    image = np.broadcast_to(mean_colour.round().astype(np.uint8), (40, 40, 3)).copy()
    out = to_model_input(eval_transform(16), image)
    assert np.abs(out).max() < 0.02


def test_synthetic_classes_are_distinguishable_by_colour() -> None:
    rng = np.random.default_rng(0)
    mean_colour = {}
    for label in CLASS_NAMES:
        pixels, geometry = draw_lesion(label, 64, rng)
        cx, cy = int(geometry["lesion_cx"] * 64), int(geometry["lesion_cy"] * 64)
        mean_colour[label] = pixels[cy - 2 : cy + 3, cx - 2 : cx + 3].mean(axis=(0, 1))
    # MEL is drawn far darker than NV at the lesion centre; VASC redder than NV.
    assert mean_colour["MEL"].sum() < mean_colour["NV"].sum() - 25
    assert mean_colour["VASC"][0] - mean_colour["VASC"][2] > 40


def test_synthetic_cli_writes_labelled_flagged_data(tmp_path: Path) -> None:
    main(["--out", str(tmp_path), "--num-images", "20", "--size", "48", "--seed", "1"])
    table = pd.read_csv(tmp_path / "metadata.csv")
    assert len(table) == 20 and set(table["label"]) == set(CLASS_NAMES)
    assert table["image"].str.startswith(SYNTHETIC_PREFIX).all()
    assert (table["origin"] == "synthetic").all()
    assert "SYNTHETIC" in (tmp_path / "README.txt").read_text()
    image = read_image(tmp_path / "images" / f"{table['image'][0]}.jpg")
    assert image.shape == (48, 48, 3)
