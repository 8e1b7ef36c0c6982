"""jobs/evaluate.py on an external set: every row (--split all), classes missing from it.

An external test set rarely has all 8 classes (ISIC 2018's test set has no SCC, PH2 has three):
the official scorer's per-class AUC at 80 % sensitivity fails on a class with no positives
("array of sample points is empty"), so classes absent from the truth must be left out of the
per-class and averaged metrics and named in the report, and a catalogue without a split column
must be scorable as it is. SYNTHETIC images; a tiny untrained model is enough to score.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_job

from dermanet.classes import CLASS_NAMES
from dermanet.data.synthetic import generate_synthetic_dataset
from dermanet.eval.isic_scorer import isic_submission, official_score
from dermanet.inference import save_checkpoint
from dermanet.models import create_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "dermanet_tiny.yaml"
evaluate_job = load_job("evaluate")

ABSENT = ["SCC", "VASC"]
PRESENT = [c for c in CLASS_NAMES if c not in ABSENT]


@pytest.fixture(scope="module")
def external_set(tmp_path_factory) -> Path:
    """48 SYNTHETIC images of 6 classes (no SCC, no VASC), no split column, two sources."""
    root = tmp_path_factory.mktemp("external")
    table = generate_synthetic_dataset(root, num_images=64, size=48, seed=3)
    table = table.loc[~table["label"].isin(ABSENT)].reset_index(drop=True)
    table["origin"] = np.where(np.arange(len(table)) % 3 == 0, "clinic_b", "clinic_a")
    columns = ["image", "label", "lesion_id", "age_approx", "sex", "anatom_site", "origin"]
    table[columns].to_csv(root / "external.csv", index=False)
    return root


def test_official_scorer_needs_the_absent_classes_left_out() -> None:
    """Why the evaluation drops absent classes: scoring them is impossible, not just poor."""
    rng = np.random.default_rng(0)
    labels = np.repeat([CLASS_NAMES.index(c) for c in PRESENT], 4)
    probs = rng.dirichlet(np.ones(len(CLASS_NAMES)), size=len(labels))
    ids = [f"img{i}" for i in range(len(labels))]
    from isic_challenge_scoring import ClassificationMetric, ClassificationScore

    truth = isic_submission(ids, np.eye(len(CLASS_NAMES))[labels]).set_index("image")
    predicted = isic_submission(ids, probs).set_index("image")
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=truth.index)
    with pytest.raises(ValueError, match="empty"):  # what jobs/evaluate.py used to die of
        ClassificationScore(truth, predicted, weights, ClassificationMetric.BALANCED_ACCURACY)
    score = official_score(ids, labels, probs)
    assert score.absent == ABSENT
    assert sorted(score.per_category.index) == sorted(PRESENT)
    recalls = [(probs.argmax(1)[labels == CLASS_NAMES.index(c)] == CLASS_NAMES.index(c)).mean()
               for c in PRESENT]  # fmt: skip
    assert score.overall == pytest.approx(np.mean(recalls))  # argmax over all 8 classes


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_external_set_without_two_classes(ray_local, external_set, tmp_path) -> None:
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", create_model(TINY), img_size=48)
    out = tmp_path / "eval"
    code = evaluate_job.main(
        ["--checkpoint", str(checkpoint), "--csv", str(external_set / "external.csv"),
         "--images", str(external_set / "images"), "--split", "all", "--output", str(out)]
    )  # fmt: skip
    assert code == 0
    catalogue = pd.read_csv(external_set / "external.csv")
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == len(catalogue)  # every row, no split invented
    assert len(pd.read_csv(out / "predictions.csv")) == len(catalogue)
    assert report["official"]["absent_classes"] == ABSENT
    assert sorted(report["official"]["per_category"]) == sorted(PRESENT)
    assert all(np.isfinite(v) for v in report["official"]["macro_average"].values())
    assert 0.0 <= report["official"]["balanced_accuracy"] <= 1.0
    assert {c: report["class_counts"][c] for c in ABSENT} == {"SCC": 0, "VASC": 0}
    assert report["temperature"] == 1.0  # nothing held out to calibrate on: left as it is
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()  # the report names the file
    assert report["model"]["id"] == "tiny" and report["model"]["sha256"] == sha
    assert sha in (out / "report.md").read_text()

    per_origin = report["per_origin"]
    counts = catalogue["origin"].value_counts().to_dict()
    assert {o: r["images"] for o, r in per_origin.items()} == counts
    for r in per_origin.values():
        assert set(ABSENT) <= set(r["official"]["absent_classes"])
    markdown = (out / "report.md").read_text()
    assert "left out of per-class and averaged metrics: SCC, VASC" in markdown
    assert "## Per origin (image source)" in markdown
    assert "| clinic_a |" in markdown and "| clinic_b |" in markdown
