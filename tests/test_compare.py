"""Comparing two models' reports: metrics as scikit-learn counts them, the paired bootstrap,
and jobs/compare.py on report folders as jobs/evaluate.py writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import load_job
from sklearn import metrics as sk

from dermanet.classes import CLASS_NAMES
from dermanet.eval.compare import (
    METRICS,
    ScoredImages,
    paired_bootstrap,
    read_image_table,
    read_report,
)
from dermanet.eval.isic_scorer import isic_submission
from dermanet.eval.metrics import (
    MELANOMA,
    auroc,
    balanced_accuracy,
    melanoma_auroc,
    per_class_auroc,
    per_class_recall,
)

REPO = Path(__file__).resolve().parents[1]
compare_job = load_job("compare")
K = len(CLASS_NAMES)


def _probs(rng: np.random.Generator, labels: np.ndarray, skill: float) -> np.ndarray:
    """Probabilities that favour the true class by `skill` (rounded, so scores tie)."""
    logits = rng.normal(size=(len(labels), K)) + skill * np.eye(K)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return np.round(probs, 2)


def test_recall_and_auroc_are_scikit_learns() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K - 1, 400)  # the last class absent: NaN, as before
    probs = _probs(rng, labels, 1.0)
    predicted = probs.argmax(axis=1)
    expected_recall = sk.recall_score(
        labels, predicted, labels=list(range(K)), average=None, zero_division=np.nan
    )
    np.testing.assert_allclose(per_class_recall(labels, predicted, K), expected_recall)
    auroc = per_class_auroc(probs, labels)
    for k in range(K - 1):
        assert auroc[k] == pytest.approx(sk.roc_auc_score(labels == k, probs[:, k]))
    assert np.isnan(auroc[K - 1])
    assert balanced_accuracy(probs, labels) == pytest.approx(
        sk.balanced_accuracy_score(labels, predicted)
    )


def test_one_auroc_for_reports_comparisons_and_the_gate() -> None:
    """The evaluate report's melanoma AUC and jobs/compare.py's are one function, scikit-learn's
    number with ties; the gate's OOD AUROC (dermanet.trust.evaluation) agrees."""
    from dermanet.trust.evaluation import auroc as gate_auroc

    rng = np.random.default_rng(3)
    labels = rng.integers(0, K, 500)
    probs = _probs(rng, labels, 1.0)  # rounded: many ties
    expected = sk.roc_auc_score(labels == MELANOMA, probs[:, MELANOMA])
    assert melanoma_auroc(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert METRICS["melanoma_auroc"] is melanoma_auroc
    scores = np.round(rng.normal(size=300), 1)
    positive = rng.random(300) < 0.3
    assert auroc(scores, positive) == pytest.approx(sk.roc_auc_score(positive, scores))
    assert gate_auroc(scores[~positive], scores[positive]) == pytest.approx(auroc(scores, positive))
    assert np.isnan(auroc(scores, np.zeros(300, bool)))


def _scored(labels: np.ndarray, probs: np.ndarray) -> ScoredImages:
    return ScoredImages(pd.Index([f"IMG_{i:04d}" for i in range(len(labels))]), probs, labels)


def test_paired_bootstrap_tells_a_real_gain_from_none_and_reads_each_group() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, K, 600)
    weak, strong = _probs(rng, labels, 0.5), _probs(rng, labels, 3.0)
    # the candidate is strong on source a's images only, and the weak model's twin on b's
    groups = pd.Series(np.where(np.arange(600) < 400, "a", "b"), index=_scored(labels, weak).images)
    mixed = np.where((groups == "a").to_numpy()[:, None], strong, weak)
    found = paired_bootstrap(
        _scored(labels, weak), _scored(labels, mixed), groups, resamples=200, progress=False
    )
    by = {(d.group, d.metric): d for d in found}
    assert {g for g, _ in by} == {"all images", "a", "b"}
    assert by["a", "balanced_accuracy"].verdict == "candidate better"
    assert by["a", "balanced_accuracy"].images == 400
    assert by["all images", "macro_auroc"].low > 0
    same = by["b", "balanced_accuracy"]
    assert same.difference == 0 and (same.low, same.high) == (0, 0)
    assert same.verdict == "within noise"
    flipped = paired_bootstrap(
        _scored(labels, mixed), _scored(labels, weak), resamples=200, progress=False
    )
    assert {d.verdict for d in flipped} == {"baseline better"}


def test_melanoma_rows_catch_a_gain_bought_with_melanoma_recall() -> None:
    """A prior shift towards common classes can hold balanced accuracy while it calls fewer
    melanomas MEL; the melanoma rows (scikit-learn's numbers) say which side lost."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, K, 800)
    base = _probs(rng, labels, 1.5)
    mel = CLASS_NAMES.index("MEL")
    shifted = base * np.where(np.arange(K) == mel, 0.4, 1.0)  # MEL's odds cut to 0.4
    shifted /= shifted.sum(axis=1, keepdims=True)
    found = paired_bootstrap(_scored(labels, base), _scored(labels, shifted), resamples=200,
                             progress=False)  # fmt: skip
    by = {d.metric: d for d in found}
    is_mel = labels == mel
    assert by["melanoma_recall"].baseline == pytest.approx(
        sk.recall_score(is_mel, base.argmax(axis=1) == mel)
    )
    assert by["melanoma_auroc"].baseline == pytest.approx(sk.roc_auc_score(is_mel, base[:, mel]))
    assert by["melanoma_recall"].verdict == "baseline better"
    assert by["melanoma_auroc"].verdict == "within noise"  # P(MEL) ranks as before
    no_melanoma = pd.Series(np.where(is_mel, "mel", "other"), index=_scored(labels, base).images)
    found = paired_bootstrap(_scored(labels, base), _scored(labels, shifted), no_melanoma,
                             resamples=20, progress=False)  # fmt: skip
    other = {d.metric: d for d in found if d.group == "other"}
    assert other["melanoma_recall"].verdict == "not defined"


def test_whole_lesions_are_drawn_and_undefined_intervals_say_so() -> None:
    """Three images of each lesion are one unit of evidence, not three: drawing lesions
    widens the interval. A group whose AUROC cannot be computed says so."""
    rng = np.random.default_rng(3)
    lesion_labels = rng.integers(0, K, 150)
    labels = np.repeat(lesion_labels, 3)  # three images per lesion, scored alike
    weak = np.repeat(_probs(rng, lesion_labels, 1.0), 3, axis=0)
    better = np.repeat(_probs(rng, lesion_labels, 1.6), 3, axis=0)
    base, cand = _scored(labels, weak), _scored(labels, better)
    lesions = pd.Series(np.repeat(np.arange(150), 3), index=base.images)

    def width(clusters: pd.Series | None) -> float:
        (d,) = paired_bootstrap(base, cand, clusters=clusters, metrics=["balanced_accuracy"],
                                resamples=300, progress=False)  # fmt: skip
        return d.high - d.low

    assert width(lesions) > 1.4 * width(None)  # ~sqrt(3) wider
    one_class = pd.Series(np.where(labels == 0, "only class 0", "rest"), index=base.images)
    found = paired_bootstrap(base, cand, one_class, resamples=50, progress=False)
    auroc = next(d for d in found if d.group == "only class 0" and d.metric == "macro_auroc")
    assert auroc.verdict == "not defined"
    elsewhere = pd.Series("x", index=[f"OTHER_{i}" for i in range(5)])
    with pytest.raises(ValueError, match="none of the 450 scored images has a group"):
        paired_bootstrap(base, cand, elsewhere, resamples=5, progress=False)


def _write_report(folder: Path, images: list[str], labels: np.ndarray, probs: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    isic_submission(images, probs).to_csv(folder / "predictions.csv", index=False)
    isic_submission(images, np.eye(K)[labels]).to_csv(folder / "truth.csv", index=False)
    return folder


def test_compare_job_prints_the_table_and_refuses_unpaired_reports(tmp_path, capsys) -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, K, 300)
    images = [f"ISIC_{i:07d}" for i in range(300)]
    base = _write_report(tmp_path / "base", images, labels, _probs(rng, labels, 0.5))
    strong = _probs(rng, labels, 3)[::-1]  # listed in another order: paired by image id
    cand = _write_report(tmp_path / "cand", images[::-1], labels[::-1], strong)
    groups = tmp_path / "metadata.csv"
    pd.DataFrame(
        {"image": [f"{i}.jpg" for i in images], "origin": ["x", "y"] * 150,
         "lesion_id": [f"L{i // 2}" for i in range(300)]}
    ).to_csv(groups, index=False)  # fmt: skip
    out = tmp_path / "diff.json"
    argv = [str(base), str(cand), "--groups", str(groups), "--resamples", "100"]
    plot = tmp_path / "diff.png"
    assert compare_job.main([*argv, "--output", str(out), "--plot", str(plot)]) == 0
    assert plot.stat().st_size > 10_000  # a drawn figure, not an empty canvas
    captured = capsys.readouterr()
    printed = captured.out
    assert "| x | 150 | balanced_accuracy |" in printed and "candidate better" in printed
    assert "drawing whole lesion_id units" in captured.err
    rows = json.loads(out.read_text())
    assert {r["group"] for r in rows} == {"all images", "x", "y"}
    assert read_image_table(groups, ["origin"]).loc["ISIC_0000001", "origin"] == "y"  # ".jpg"

    weak = _probs(rng, labels, 1)[:200]
    fewer = _write_report(tmp_path / "fewer", images[:200], labels[:200], weak)
    assert compare_job.main([str(base), str(fewer)]) == 2
    assert "score different images (100 in one only" in capsys.readouterr().err
    assert compare_job.main([str(base), str(tmp_path / "nowhere")]) == 2
    assert "jobs/evaluate.py --output folder" in capsys.readouterr().err
    assert compare_job.main([*argv, "--group-by", "sex"]) == 2
    assert "no column(s) ['sex']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="different truth"):
        paired_bootstrap(read_report(base), ScoredImages(read_report(base).images,
                         read_report(base).probs, (read_report(base).labels + 1) % K))  # fmt: skip


def test_compare_job_help_explains_every_flag() -> None:
    for action in compare_job.build_parser()._actions:
        assert action.help, f"flag {action.option_strings} has no help text"
