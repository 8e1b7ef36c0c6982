"""The gate's second look: hair and ink painted out (dermanet.trust.cleaning), the cleaned
image's verdict (second_look_gate) and the gate scores it gives reports (with_second_look).
The shipped model's second look on real hair and ink is tested in test_trust_sample.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dermanet.data.synthetic import draw_lesion
from dermanet.trust import (
    artefact_mask,
    fit_ood_detector,
    gate_decision,
    remove_artefacts,
    second_look_gate,
    with_second_look,
)
from dermanet.trust.cleaning import CLEANING_SIDE
from dermanet.trust.quality import QualityReport


def lesion(size: int = 256, seed: int = 0) -> np.ndarray:
    return draw_lesion("NV", size, np.random.default_rng(seed))[0]


def with_hair_and_ink(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image with three dark 2 px hairs and a purple marker stroke; their masks."""
    picture = Image.fromarray(image)
    hair_layer, ink_layer = Image.new("L", picture.size), Image.new("L", picture.size)
    draw = ImageDraw.Draw(picture)
    for start, end in (((10, 20), (240, 200)), ((30, 240), (220, 15)), ((0, 128), (256, 110))):
        draw.line((start, end), fill=(35, 25, 20), width=2)
        ImageDraw.Draw(hair_layer).line((start, end), fill=255, width=2)
    draw.line(((20, 60), (90, 40)), fill=(110, 40, 170), width=6)
    ImageDraw.Draw(ink_layer).line(((20, 60), (90, 40)), fill=255, width=6)
    return np.asarray(picture), np.asarray(hair_layer) > 0, np.asarray(ink_layer) > 0


def test_hair_and_ink_are_masked_and_little_else() -> None:
    plain = lesion()
    drawn, hair, ink = with_hair_and_ink(plain)
    mask = artefact_mask(drawn)
    assert mask[hair].mean() > 0.9, mask[hair].mean()
    assert mask[ink].mean() > 0.9, mask[ink].mean()
    assert artefact_mask(plain).mean() < 0.05  # a lesion's own pigment network stays


def test_removing_artefacts_restores_the_skin_under_them() -> None:
    plain = lesion()
    drawn, hair, ink = with_hair_and_ink(plain)
    cleaned = remove_artefacts(drawn)
    assert cleaned.shape == drawn.shape and cleaned.dtype == np.uint8
    drawn_error = np.abs(drawn.astype(int) - plain)[hair | ink].mean()
    cleaned_error = np.abs(cleaned.astype(int) - plain)[hair | ink].mean()
    assert cleaned_error < 0.4 * drawn_error, (cleaned_error, drawn_error)
    untouched = ~artefact_mask(drawn)
    assert np.array_equal(cleaned[untouched], drawn[untouched])  # only masked pixels change
    assert remove_artefacts(drawn) is not drawn  # never the caller's array, even when clean


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 3), np.float32)])
def test_rejects_non_rgb_arrays(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="RGB uint8"):
        remove_artefacts(bad)


def refused_on_ood(score: float = 5.0, threshold: float = 3.0) -> dict:
    return gate_decision(QualityReport(ok=True, reasons=[], measures={}), score, threshold)


def test_second_look_accepts_only_within_its_own_threshold() -> None:
    first = refused_on_ood()
    gate = second_look_gate(first, 1.5, 2.0)
    assert gate["accepted"] and gate["reasons"] == []
    assert gate["ood_score"] == 1.5 and gate["ood_threshold"] == 2.0
    assert "painted out" in gate["checks"] and "5 > 3" in gate["checks"]  # the first verdict
    for score in (2.5, float("inf"), float("nan")):
        assert second_look_gate(first, score, 2.0) is first


def test_report_scores_after_the_second_look() -> None:
    gate = np.array([0.5, 5.0, 5.0, np.inf, 6.0])
    second = np.array([np.nan, 1.0, 2.5, 0.0, np.nan])  # inf: a quality check failed
    scores = with_second_look(gate, 3.0, second, 2.0)
    assert list(scores > 3.0) == [False, False, True, True, True]
    assert scores[1] == 1.0
    with pytest.raises(ValueError, match="second-look scores"):
        with_second_look(gate, 3.0, second[:2], 2.0)


def test_fitted_statistics_carry_a_stricter_second_look_threshold() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 60)
    train = np.abs(rng.normal(1.0, 0.3, (240, 16))) + labels[:, None] * 0.5
    val = np.abs(rng.normal(1.0, 0.3, (240, 16))) + labels[:, None] * 0.5
    logits = rng.normal(size=(240, 4))
    for views in ((), [(train * 1.1, val * 1.1, logits)]):
        stats = fit_ood_detector(train, labels, val, logits, val_labels=labels, views=views)
        assert stats["second_look_threshold"] <= stats["threshold"]


def test_large_pictures_are_cleaned_at_the_working_size() -> None:
    drawn, _, _ = with_hair_and_ink(lesion(256))
    large = np.repeat(np.repeat(drawn, 3, axis=0), 3, axis=1)  # 768 x 768
    cleaned = remove_artefacts(large)
    assert cleaned.shape == (CLEANING_SIDE, CLEANING_SIDE, 3)
    assert artefact_mask(cleaned).mean() < 0.5 * artefact_mask(drawn).mean()
