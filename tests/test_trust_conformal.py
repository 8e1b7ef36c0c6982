"""Conformal prediction sets (dermanet.trust.conformal) on exchangeable synthetic data."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from dermanet.classes import CLASS_NAMES
from dermanet.trust import CONFORMAL_METHODS, fit_conformal, prediction_sets, set_report

PRIORS = np.array([0.02, 0.05, 0.11, 0.02, 0.15, 0.6, 0.03, 0.02])  # ISIC-like imbalance


def draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Model probabilities and labels drawn from them (with a miscalibrating temperature):
    calibration and test sets are exchangeable, as conformal prediction assumes."""
    rng = np.random.default_rng(seed)
    true = rng.choice(len(PRIORS), size=n, p=PRIORS)
    logits = rng.normal(0, 1.0, (n, len(PRIORS))) + 2.0 * np.eye(len(PRIORS))[true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(len(PRIORS), p=p) for p in probs])
    sharpened = probs**1.5 / (probs**1.5).sum(1, keepdims=True)  # overconfident model
    return sharpened, labels


@pytest.fixture(scope="module")
def calibration():
    return draw(3000, 0)


@pytest.fixture(scope="module")
def test_data():
    return draw(20000, 1)


@pytest.mark.parametrize("method", CONFORMAL_METHODS)
def test_coverage_lands_near_the_target(calibration, test_data, method: str) -> None:
    for coverage in (0.8, 0.9):
        stats = fit_conformal(*calibration, coverage=coverage, method=method)
        probs, labels = test_data
        report = set_report(prediction_sets(probs, stats), labels, CLASS_NAMES)
        # Never-empty sets add the top class where the rule selects nothing, which can only
        # raise coverage; APS's rule selects nothing whenever p_top > q, so it over-covers most.
        slack = 0.06 if method == "aps" else 0.025
        assert coverage - 0.02 < report["coverage"] < coverage + slack, (method, coverage, report)
        assert 1 <= report["mean_size"] < len(PRIORS)


def test_mondrian_covers_every_class(calibration, test_data) -> None:
    probs, labels = test_data
    mondrian = set_report(prediction_sets(probs, fit_conformal(*calibration)), labels, CLASS_NAMES)
    lac = set_report(
        prediction_sets(probs, fit_conformal(*calibration, method="lac")), labels, CLASS_NAMES
    )
    for name, row in mondrian["per_class"].items():
        assert row["coverage"] > 0.85, (name, row)
    worst = min(r["coverage"] for r in lac["per_class"].values())
    assert worst < min(r["coverage"] for r in mondrian["per_class"].values())


def test_sets_are_ordered_and_never_empty(calibration) -> None:
    stats = fit_conformal(*calibration, coverage=0.05, method="lac")  # tiny sets, many empty
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    probs = np.hstack([probs, np.zeros((2, 5))])
    sets = prediction_sets(probs, stats)
    assert sets[0][0] == 0 and sets[1][0] == 2
    wide = prediction_sets(probs, {**stats, "qhat": 0.95})
    assert wide[0] == [0, 1, 2] and wide[1] == [2, 0, 1]


def test_threshold_is_the_conformal_order_statistic() -> None:
    """k = ceil((n+1)·coverage): with 21 calibration scores at 90 %, the 20th smallest. One
    outlier (a confidently wrong image) must not set the threshold of a small class."""
    scores = np.r_[np.linspace(0.01, 0.19, 19), 0.5, 0.999]  # 21 true-class scores
    probs = np.zeros((21, 8))
    probs[:, 0] = 1.0 - scores
    probs[:, 1] = scores
    stats = fit_conformal(probs, np.zeros(21, dtype=int), coverage=0.9, method="lac")
    assert stats["qhat"] == pytest.approx(0.5)
    stats = fit_conformal(probs[:9], np.zeros(9, dtype=int), coverage=0.9, method="lac")
    assert stats["qhat"] == pytest.approx(scores[8])  # k = 9 = n: the largest of nine


def test_rare_class_without_enough_examples_is_always_included() -> None:
    probs, labels = draw(2000, 3)
    rare = np.flatnonzero(labels == 7)
    keep = np.r_[np.flatnonzero(labels != 7), rare[:3]]  # 3 examples: too few for 90 %
    stats = fit_conformal(probs[keep], labels[keep], method="mondrian")
    assert stats["class_counts"][7] == 3 and stats["qhat"][7] == 1.0
    assert all(7 in s for s in prediction_sets(draw(50, 4)[0], stats))


@pytest.mark.parametrize("method", CONFORMAL_METHODS)
def test_stats_are_plain_and_weights_only_loadable(calibration, method: str) -> None:
    stats = fit_conformal(*calibration, method=method)
    json.dumps(stats)  # plain types only
    buffer = io.BytesIO()
    torch.save(stats, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == stats


def test_clear_errors(calibration) -> None:
    probs, labels = calibration
    with pytest.raises(ValueError, match="sum to 1"):
        fit_conformal(probs * 2, labels)  # e.g. unnormalised scores
    with pytest.raises(ValueError, match="class indices"):
        fit_conformal(probs, labels + 8)
    with pytest.raises(ValueError, match="unknown conformal method"):
        fit_conformal(probs, labels, method="magic")
    with pytest.raises(ValueError, match="coverage"):
        fit_conformal(probs, labels, coverage=90)
    stats = fit_conformal(probs, labels)
    with pytest.raises(ValueError, match="classes"):
        prediction_sets(probs[:, :4] / probs[:, :4].sum(1, keepdims=True), stats)
