"""OOD scores (dermanet.trust.ood), feature extraction and the gate decision, without
derm-sample: separated synthetic clusters, a tiny real model on SYNTHETIC lesions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from dermanet.data.synthetic import draw_lesion
from dermanet.inference import Predictor, load_checkpoint, save_checkpoint
from dermanet.inference.features import extract_features
from dermanet.models import create_model
from dermanet.trust import (
    OOD_METHODS,
    assess_quality,
    auroc,
    fit_ood_detector,
    fit_trust_statistics,
    gate_decision,
    gate_scores,
    ood_report,
    ood_scores,
    refusal_report,
    stats_nbytes,
)
from dermanet.trust.quality import QualityReport
from tools.dermatoscope_artefacts import artefact_image

TINY = Path(__file__).resolve().parents[1] / "configs" / "dermanet_tiny.yaml"
DIM, CLASSES = 32, 4


def clusters(n: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive features (like GeM's) around one centre per class, and logits that favour it.

    `shift` moves every point away from all class centres (out of distribution), not just by
    a common factor (which cosine distances would rightly ignore)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(0, 1.0, (CLASSES, DIM))
    labels = rng.integers(0, CLASSES, n)
    away = np.random.default_rng(456).normal(0, 1.0, DIM)  # a direction no class lies in
    log_features = centres[labels] + rng.normal(0, 0.3, (n, DIM)) + shift * away
    features = np.exp(log_features)
    logits = 3 * np.eye(CLASSES)[labels] + rng.normal(0, 1, (n, CLASSES))
    if shift:
        logits = rng.normal(0, 1, (n, CLASSES))
    return features, logits, labels


@pytest.fixture(scope="module")
def data():
    train = clusters(2000, 0)
    val = clusters(600, 1)
    test = clusters(600, 2)
    out = clusters(300, 3, shift=1.5)
    return train, val, test, out


@pytest.mark.parametrize("method", OOD_METHODS)
def test_scores_rank_separated_clusters(data, method: str) -> None:
    (trf, _, trl), (vf, vl, vy), (tf, tl, _), (of, ol, _) = data
    stats = fit_ood_detector(
        trf, trl, vf, vl, method=method, target_fpr=0.05, knn_k=10, val_labels=vy
    )
    assert stats["method"] == method and stats["val_rejection_rate"] <= 0.05
    test_scores, out_scores = ood_scores(stats, tf, tl), ood_scores(stats, of, ol)
    report = ood_report(test_scores, out_scores, stats["threshold"])
    if method == "energy":  # logits only: a weaker, but still useful, signal here
        assert report["auroc"] > 0.7
    else:
        assert report["auroc"] > 0.98, report
        assert report["out_rejected"] > 0.9
    assert report["in_rejected"] < 0.1  # exchangeable with val: close to the 5 % target


@pytest.mark.parametrize("method", OOD_METHODS)
def test_stats_survive_weights_only_load(data, method: str) -> None:
    (trf, _, trl), (vf, vl, vy), (tf, tl, _), _ = data
    stats = fit_ood_detector(trf, trl, vf, vl, method=method, knn_k=10, val_labels=vy)
    buffer = io.BytesIO()
    torch.save({"trust": {"ood": stats}}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["trust"]["ood"]
    np.testing.assert_allclose(ood_scores(loaded, tf, tl), ood_scores(stats, tf, tl), rtol=1e-6)
    assert loaded["threshold"] == stats["threshold"]
    assert stats_nbytes(stats) < 300_000


def test_threshold_meets_the_target_false_rejection(data) -> None:
    (trf, _, trl), (vf, vl, _), _, _ = data
    for fpr in (0.01, 0.05, 0.2):
        stats = fit_ood_detector(trf, trl, vf, vl, method="mahalanobis_log", target_fpr=fpr)
        val_scores = ood_scores(stats, vf, vl)
        assert (val_scores > stats["threshold"]).mean() <= fpr
        assert (val_scores >= stats["threshold"]).mean() > fpr - 0.01  # not needlessly loose


def test_threshold_meets_the_target_for_every_class(data) -> None:
    """With val labels, no class's val images are refused more than the target, and the
    worst class sits at it (one threshold, the largest of the per-class ones)."""
    (trf, _, trl), (vf, vl, vy), _, _ = data
    for fpr in (0.03, 0.1):
        stats = fit_ood_detector(trf, trl, vf, vl, target_fpr=fpr, val_labels=vy)
        refused = ood_scores(stats, vf, vl) > stats["threshold"]
        per_class = [refused[vy == c].mean() for c in range(CLASSES)]
        assert max(per_class) <= fpr
        assert max((ood_scores(stats, vf, vl) >= stats["threshold"])[vy == c].mean()
                   for c in range(CLASSES)) > fpr - 0.02  # fmt: skip


def rare_far_class(seed: int, n: int, rare_share: float) -> tuple[np.ndarray, ...]:
    """Three common classes close together and one rare class far from them (the vascular
    lesions of ISIC: 1 % of the images, unlike the bulk)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(7).normal(0, 0.4, (CLASSES, DIM))
    centres[3] += 2.0 * np.random.default_rng(8).normal(0, 1.0, DIM)  # far from the bulk
    shares = np.r_[np.full(3, (1 - rare_share) / 3), rare_share]
    labels = rng.choice(CLASSES, size=n, p=shares)
    features = np.exp(centres[labels] + rng.normal(0, 0.3, (n, DIM)))
    logits = 3 * np.eye(CLASSES)[labels] + rng.normal(0, 1, (n, CLASSES))
    return features, logits, labels


def test_a_rare_class_far_from_the_bulk_is_not_refused() -> None:
    """The default scores "far from every class", each on its own scale: a rare class far
    from the common ones keeps its refusals near the target, while a pooled k-NN score
    (mostly common-class neighbours) refuses most of it."""
    trf, _, trl = rare_far_class(0, 4000, 0.01)
    vf, vl, vy = rare_far_class(1, 3000, 0.01)
    tf, tl, ty = rare_far_class(2, 6000, 0.01)
    of, ol, _ = clusters(300, 3, shift=1.5)
    rare = ty == 3
    stats = fit_ood_detector(trf, trl, vf, vl, target_fpr=0.03, val_labels=vy)
    refused = ood_scores(stats, tf, tl) > stats["threshold"]
    assert refused[rare].mean() < 0.15 and refused[~rare].mean() < 0.06
    assert (ood_scores(stats, of, ol) > stats["threshold"]).mean() > 0.9
    pooled = fit_ood_detector(trf, trl, vf, vl, method="knn", target_fpr=0.03, knn_k=50)
    assert (ood_scores(pooled, tf, tl) > pooled["threshold"])[rare].mean() > 0.5


def framed(features: np.ndarray) -> np.ndarray:
    """The same images seen another way (a dermatoscope's frame): every feature moved along
    one fixed direction in log space, far beyond the plain images' spread."""
    return features * np.exp(1.5 * np.random.default_rng(789).normal(0, 1.0, DIM))


def test_reference_views_accept_both_views_and_keep_the_per_class_bound(data) -> None:
    """With the framed view as a second reference view, framed images pass like plain ones,
    no class's val refusals exceed the target (an image is refused only when every view
    refuses it), out-of-distribution images are still refused, and the score is the plain
    view's, where that refuses: its threshold + the smaller of the two views' margins."""
    (trf, _, trl), (vf, vl, vy), (tf, tl, _), (of, ol, _) = data
    plain = fit_ood_detector(trf, trl, vf, vl, val_labels=vy)
    assert (ood_scores(plain, framed(tf), tl) > plain["threshold"]).mean() > 0.9
    views = [(framed(trf), framed(vf), vl)]
    stats = fit_ood_detector(trf, trl, vf, vl, val_labels=vy, views=views)
    assert stats["threshold"] == plain["threshold"] and len(stats["views"]) == 2
    refused = ood_scores(stats, vf, vl) > stats["threshold"]
    assert max(refused[vy == c].mean() for c in range(CLASSES)) <= 0.03
    for features in (tf, framed(tf)):
        assert (ood_scores(stats, features, tl) > stats["threshold"]).mean() < 0.06
    assert (ood_scores(stats, of, ol) > stats["threshold"]).mean() > 0.9
    second = stats["views"][1]
    for features, logits in ((of, ol), (framed(tf), tl), (tf, tl)):
        first = ood_scores(plain, features, logits)
        expected = np.where(
            first <= plain["threshold"],
            first,
            plain["threshold"] + np.minimum(
                first - plain["threshold"],
                ood_scores(second, features, logits) - second["threshold"],
            ),
        )  # fmt: skip
        np.testing.assert_allclose(ood_scores(stats, features, logits), expected)
    buffer = io.BytesIO()
    torch.save(stats, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    np.testing.assert_allclose(ood_scores(loaded, of, ol), ood_scores(stats, of, ol))
    with pytest.raises(ValueError, match="row for row"):
        fit_ood_detector(trf, trl, vf, vl, val_labels=vy, views=[(framed(trf[:-1]), vf, vl)])


def test_non_finite_inputs_are_out_of_distribution(data) -> None:
    (trf, _, trl), (vf, vl, vy), _, _ = data
    stats = fit_ood_detector(trf, trl, vf, vl, val_labels=vy)
    features, logits = vf[:3].copy(), vl[:3].copy()
    features[1, 0] = np.nan
    logits[2, 1] = np.inf
    scores = ood_scores(stats, features, logits)
    assert np.isfinite(scores[0]) and np.isinf(scores[1:]).all()
    assert len(ood_scores(stats, np.zeros((0, DIM)), np.zeros((0, CLASSES)))) == 0


def test_clear_errors(data) -> None:
    (trf, _, trl), (vf, vl, vy), _, _ = data
    with pytest.raises(ValueError, match="needs val_labels"):
        fit_ood_detector(trf, trl, vf, vl)
    with pytest.raises(ValueError, match="unknown OOD method"):
        fit_ood_detector(trf, trl, vf, vl, method="magic")
    with pytest.raises(ValueError, match="dimensions"):
        fit_ood_detector(trf, trl, vf[:, :5], vl)
    with pytest.raises(ValueError, match="NaN"):
        fit_ood_detector(np.full_like(trf, np.nan), trl, vf, vl, val_labels=vy)
    stats = fit_ood_detector(trf, trl, vf, vl, val_labels=vy)
    with pytest.raises(ValueError, match="dimensions"):
        ood_scores(stats, vf[:, :5], vl)
    with pytest.raises(ValueError, match="refit"):
        ood_scores({"method": "mahalanobis_log", "version": 99}, vf, vl)


def test_gate_decision_contract() -> None:
    ok = QualityReport(ok=True)
    accepted = gate_decision(ok, 0.8, 1.5)
    assert accepted == {"accepted": True, "reasons": [], "ood_score": 0.8, "ood_threshold": 1.5}
    rejected = gate_decision(ok, 3.25, 1.5)
    assert not rejected["accepted"]
    assert rejected["reasons"] == ["unlike the training images (OOD score 3.25 > threshold 1.5)"]
    bad = assess_quality(np.zeros((24, 24, 3), np.uint8))
    quality_only = gate_decision(bad, None, None)  # not run / no OOD statistics in the model
    assert not quality_only["accepted"] and quality_only["reasons"] == bad.reasons
    assert quality_only["ood_score"] is None and quality_only["ood_threshold"] is None
    assert gate_decision(ok, None, None)["accepted"]
    broken = gate_decision(ok, float("inf"), 1.5)  # JSON has no infinity
    assert not broken["accepted"] and broken["ood_score"] is None


def test_auroc_and_gate_scores() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 300), rng.normal(1, 1, 200)
    expected = roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[a, b])
    assert auroc(a, b) == pytest.approx(expected)
    assert auroc([0.0, 1.0], [np.inf, np.inf]) == 1.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    scores = gate_scores([True, False, True], np.array([0.1, 0.2, 9.0]))
    assert scores.tolist() == [0.1, np.inf, 9.0]
    report = ood_report([0.1, 0.2], scores, threshold=1.0, out_kinds=["a", "b", "b"])
    assert report["out_rejected"] == pytest.approx(2 / 3) and report["in_rejected"] == 0.0
    assert report["per_kind"]["a"]["rejected"] == 0.0 and report["per_kind"]["b"]["rejected"] == 1.0


def test_extract_features_matches_the_predictor(tmp_path: Path) -> None:
    """Features + logits in one forward, exactly what serving's Predictor computes."""
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "t.pt", create_model(TINY), img_size=48, temperature=0.7)
    predictor = Predictor(load_checkpoint(path))
    rng = np.random.default_rng(0)
    labels = ["AK", "MEL", "NV", "VASC"] * 10
    images = [draw_lesion(label, 96, rng)[0] for label in labels]
    features, logits = extract_features(predictor, iter(images), batch_size=16)
    assert features.shape == (40, 128) and logits.shape == (40, 8)
    assert features.dtype == np.float32 and (features > 0).all()  # GeM output is positive
    expected = predictor.probabilities(images)
    calibrated = torch.softmax(torch.from_numpy(logits).double() / 0.7, dim=1).numpy()
    np.testing.assert_allclose(calibrated, expected, atol=1e-5)
    empty_f, empty_l = extract_features(predictor, [], batch_size=4)
    assert empty_f.shape == (0, 128) and empty_l.shape == (0, 8)
    y = np.array([["AK", "MEL", "NV", "VASC"].index(x) for x in labels])
    trust = fit_trust_statistics(features, y, features, logits, y, temperature=0.7)
    assert set(trust) == {"ood", "conformal"}
    buffer = io.BytesIO()
    torch.save(trust, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["conformal"] == trust["conformal"]


def test_refusal_report_per_class_and_source() -> None:
    """Refusals per class and source; coverage and set size only over accepted images."""
    refused = np.array([True, False, False, True, False])
    labels = np.array([0, 0, 1, 1, 1])
    sets = [[0], [1], [1, 0], [1], [0]]
    report = refusal_report(refused, labels, ["A", "B", "C"], sets, ["x", "x", "y", "y", "y"])
    a, b, c = (report["per_class"][k] for k in "ABC")
    assert a == {"n": 2, "refused": 0.5, "coverage": 0.0, "mean_size": 1.0}
    assert b == {"n": 3, "refused": pytest.approx(1 / 3), "coverage": 0.5, "mean_size": 1.5}
    assert c["n"] == 0 and np.isnan(c["refused"])
    assert report["per_source"]["x"]["refused"] == 0.5
    assert report["per_source"]["y"]["coverage"] == 0.5
    with pytest.raises(ValueError, match="labels"):
        refusal_report(refused[:2], labels, ["A", "B"])


def test_artefact_view_is_seeded_and_draws_on_the_image() -> None:
    """The artefact view (hair, ink, rulers) is the same for the same seed, another for
    another, changes only part of the picture (darker: hair), keeps shape and dtype."""
    image = draw_lesion("NV", 160, np.random.default_rng(0))[0][:120]
    drawn = artefact_image(image, 3)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    np.testing.assert_array_equal(drawn, artefact_image(image, 3))
    assert not np.array_equal(drawn, artefact_image(image, 4))
    changed = (drawn != image).any(axis=2).mean()
    assert 0.01 < changed < 0.6, changed
    assert drawn[(drawn != image).any(axis=2)].mean() < image.mean()  # hair is dark
