"""Conformal prediction sets (dermanet.trust.conformal) on exchangeable synthetic data."""

from __future__ import annotations

import io
import json
import math

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
        stats = fit_conformal(*calibration, coverage, method, delta=None, margin=0.0)
        probs, labels = test_data
        report = set_report(prediction_sets(probs, stats), labels, CLASS_NAMES)
        # Never-empty sets add the top class where the rule selects nothing, which can only
        # raise coverage; APS's rule selects nothing whenever p_top > q, so it over-covers most.
        slack = 0.06 if "aps" in method else 0.025
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


def test_default_sets_state_the_nominal_level_and_cover_every_class_above_it(
    calibration, test_data
) -> None:
    """Class-conditional APS fitted at 0.9 + margin: each class's threshold is its own order
    statistic of APS scores at 0.94, every class covered at about 0.94 on exchangeable data,
    and the statistics (what the API and the dashboard state) say 0.9."""
    probs, labels = calibration
    stats = fit_conformal(probs, labels)
    assert (stats["method"], stats["coverage"], stats["margin"]) == ("mondrian_aps", 0.9, 0.04)
    order = np.argsort(-probs, axis=1, kind="stable")
    mass = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    aps = np.empty_like(probs)
    np.put_along_axis(aps, order, mass, axis=1)
    for k, qhat in enumerate(stats["qhat"]):
        own = np.sort(aps[labels == k, k])
        assert qhat == pytest.approx(own[math.ceil((len(own) + 1) * 0.94) - 1])
    report = set_report(prediction_sets(test_data[0], stats), test_data[1], CLASS_NAMES)
    for name, row in report["per_class"].items():
        assert row["coverage"] > 0.915, (name, row)
    at_nominal = fit_conformal(probs, labels, margin=0.0)
    plain = set_report(prediction_sets(test_data[0], at_nominal), test_data[1], CLASS_NAMES)
    assert plain["mean_size"] < report["mean_size"]  # the margin costs set size


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
    zeros = np.zeros(21, dtype=int)
    plain = {"coverage": 0.9, "method": "lac", "delta": None, "margin": 0.0}
    stats = fit_conformal(probs, zeros, **plain)
    assert stats["qhat"] == pytest.approx(0.5)
    stats = fit_conformal(probs[:9], zeros[:9], **plain)
    assert stats["qhat"] == pytest.approx(scores[8])  # k = 9 = n: the largest of nine
    # the default margin fits at 0.94: k = ceil(22 · 0.94) = 21, the largest score; the
    # statistics still state 0.9
    stats = fit_conformal(probs, zeros, coverage=0.9, method="lac", delta=None)
    assert stats["qhat"] == pytest.approx(0.999) and stats["coverage"] == 0.9
    assert stats["margin"] == 0.04
    # with delta 0.1: the smallest k with P(Beta(k, n+1-k) >= 0.9) >= 0.9; for n = 21 none
    # is (k = 21 gives 1 - 0.9^21 = 0.89), so the class is always included
    assert fit_conformal(probs, zeros, **{**plain, "delta": 0.1})["qhat"] == 1.0
    assert fit_conformal(probs, zeros, **{**plain, "delta": 0.2})["qhat"] == 0.999


def test_margin_holds_coverage_for_most_calibration_draws() -> None:
    """A class's threshold swings with the calibration draw: without a margin about half the
    draws cover the class (NV here) below the target; with delta = 0.1 about 10 % do."""
    probs, labels = draw(6000, 1)
    nv = probs[labels == CLASS_NAMES.index("NV")]
    below = {None: 0, 0.1: 0}
    for seed in range(40):
        calibration = draw(600, 100 + seed)
        for delta in below:
            stats = fit_conformal(*calibration, 0.9, "mondrian", delta, margin=0.0)
            covered = np.mean([CLASS_NAMES.index("NV") in s for s in prediction_sets(nv, stats)])
            below[delta] += covered < 0.9
    assert below[None] >= 14 and below[0.1] <= 10, below


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
    with pytest.raises(ValueError, match="delta"):
        fit_conformal(probs, labels, delta=1.5)
    with pytest.raises(ValueError, match="margin"):
        fit_conformal(probs, labels, coverage=0.9, margin=0.1)  # fits at 100 %
    stats = fit_conformal(probs, labels)
    with pytest.raises(ValueError, match="classes"):
        prediction_sets(probs[:, :4] / probs[:, :4].sum(1, keepdims=True), stats)
