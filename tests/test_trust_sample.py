"""The trust layer on the real derm-sample and the shipped default model (skipped without them):
real dermoscopy passes the quality checks, the gate refuses non-dermoscopic pictures while
accepting nearly all test images of EVERY class and dermatoscope artefacts (round vignettes,
hair, rulers, ink, gel bubbles), and prediction sets cover the truth at the stated rate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dermanet.classes import CLASS_NAMES
from dermanet.data.splits import assign_splits
from dermanet.eval.trust_eval import read_ood_manifest, vignette_image
from dermanet.inference import Predictor, load_checkpoint
from dermanet.inference.features import extract_features, iter_images
from dermanet.trust import (
    assess_quality,
    calibrated_probabilities,
    fit_conformal,
    fit_ood_detector,
    gate_scores,
    ood_report,
    ood_scores,
    prediction_sets,
    set_report,
)
from tools.ood_set import CHROMIUM, build_ood_set

pytestmark = pytest.mark.sample
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "weights" / "default.pt"
ARTEFACTS = Path(__file__).resolve().parents[1] / "benchmarks" / "dermatoscope_artefacts.csv"


@pytest.fixture(scope="module")
def splits(derm_sample_catalogue: pd.DataFrame) -> dict[str, pd.DataFrame]:
    catalogue = assign_splits(derm_sample_catalogue, seed=0)
    return {s: catalogue.loc[catalogue["split"] == s].sort_values("image") for s in
            ("train", "val", "test")}  # fmt: skip


def test_real_val_images_pass_the_quality_checks(splits) -> None:
    rows = splits["val"].sample(n=400, random_state=0)
    reports = [assess_quality(image) for image in iter_images(rows["path"])]
    failed = [(p, r.reasons) for p, r in zip(rows["path"], reports, strict=True) if not r.ok]
    assert len(failed) <= 0.02 * len(rows), failed  # the thresholds' budget: <= 2 % of val


@pytest.fixture(scope="module")
def model_outputs(splits, derm_sample: Path, tmp_path_factory: pytest.TempPathFactory):
    if not DEFAULT_MODEL.is_file():
        pytest.skip(f"{DEFAULT_MODEL} not found (the shipped default model)")
    loaded = load_checkpoint(DEFAULT_MODEL)
    # as served (the served backend and views); the gate is fitted on the plain view's training
    # features, as jobs/evaluate.py --export fits it
    predictor = Predictor(loaded, backend="auto")
    plain = Predictor(dataclasses.replace(loaded, tta="none"), backend="auto")
    # samples, not whole splits: val and test run the served views (4 flips each), and this
    # fixture was the suite's longest step with the 192 px model
    chosen = {
        "train": splits["train"].sample(n=2000, random_state=0),
        "val": splits["val"].sample(n=1000, random_state=0),
        "test": splits["test"].sample(n=600, random_state=0),
    }
    out = {
        s: extract_features(plain if s == "train" else predictor, iter_images(r["path"]), 128)
        for s, r in chosen.items()
    }
    labels = {s: r["label"].map(CLASS_NAMES.index).to_numpy() for s, r in chosen.items()}
    folder = tmp_path_factory.mktemp("ood")
    counts = {"screenshot": 4 if CHROMIUM is not None else 0, "plot": 5, "document": 5,
              "photo": 10, "pattern": 9, "noise": 5, "degraded_derm": 10}  # fmt: skip
    build_ood_set(folder, derm_sample, seed=1, counts=counts)
    manifest = read_ood_manifest(folder)
    out["ood"] = extract_features(predictor, iter_images(manifest["file"]), 64)
    quality = {
        "test": [assess_quality(im).ok for im in iter_images(chosen["test"]["path"])],
        "ood": [assess_quality(im).ok for im in iter_images(manifest["file"])],
    }
    return loaded, out, labels, quality, manifest, predictor, chosen


def test_gate_refuses_non_dermoscopic_pictures_and_accepts_test_images(model_outputs) -> None:
    _, out, labels, quality, manifest, _, _ = model_outputs
    stats = fit_ood_detector(
        out["train"][0], labels["train"], *out["val"], val_labels=labels["val"]
    )
    test_scores = gate_scores(quality["test"], ood_scores(stats, *out["test"]))
    ood = gate_scores(quality["ood"], ood_scores(stats, *out["ood"]))
    report = ood_report(test_scores, ood, stats["threshold"], manifest["kind"])
    assert report["in_rejected"] <= 0.08, report  # target 5 % on val; 600 test images
    assert report["out_rejected"] >= 0.9, report
    assert report["auroc"] > 0.95, report


def test_prediction_sets_cover_the_truth_at_the_stated_rate(model_outputs) -> None:
    loaded, out, labels, _, _, _, _ = model_outputs
    val_probs = calibrated_probabilities(out["val"][1], loaded.temperature)
    test_probs = calibrated_probabilities(out["test"][1], loaded.temperature)
    for method in ("mondrian", "lac"):
        stats = fit_conformal(val_probs, labels["val"], 0.9, method, delta=None, margin=0.0)
        report = set_report(prediction_sets(test_probs, stats), labels["test"], CLASS_NAMES)
        assert 0.85 <= report["coverage"] <= 0.95, (method, report)
        assert report["mean_size"] < 6, (method, report)
    assert np.isfinite(test_probs).all()


def test_shipped_gate_refuses_no_class_much_and_its_sets_cover_every_class(model_outputs) -> None:
    """The shipped statistics on test images: no class is refused much more than the 3 % its
    val images were (the gate refuses pictures, not patients), and the sets on the accepted
    images cover each class (a margin for the few calibration images of rare classes)."""
    loaded, out, labels, quality, _, _, _ = model_outputs
    stats = loaded.trust
    refused = gate_scores(quality["test"], ood_scores(stats["ood"], *out["test"])) > float(
        stats["ood"]["threshold"]
    )
    assert refused.mean() <= 0.04, refused.mean()
    probs = calibrated_probabilities(out["test"][1], loaded.temperature)
    sets = prediction_sets(probs[~refused], stats["conformal"])
    report = set_report(sets, labels["test"][~refused], CLASS_NAMES)
    for k, name in enumerate(CLASS_NAMES):
        rows = labels["test"] == k
        if rows.sum() >= 15:  # 600 sampled test images: NV ... BCC; rarer classes are noise
            # at most 8 %, or 3 images where that is fewer (27 sampled BCCs: 3.7 % an image)
            assert refused[rows].sum() <= max(3, 0.08 * rows.sum()), (name, refused[rows].sum())
            assert report["per_class"][name]["coverage"] >= 0.8, (name, report["per_class"][name])


def test_dermatoscope_artefacts_are_not_refused(model_outputs, splits) -> None:
    """Round black vignettes, hair, rulers, ink marks and gel bubbles are ordinary dermoscopy:
    the listed real images pass the quality checks, and those with round frames and HAM10000
    test images given one pass the shipped gate. Hair, rulers, ink and bubbles still sit in the
    OOD score's tail (docs/trust.md): bounded here at the measured level, not the 3 % aim."""
    loaded, _, _, _, _, predictor, _ = model_outputs
    listed = pd.read_csv(ARTEFACTS)
    listed = listed.loc[listed["kind"] != "sticker"]  # colour-calibration stickers: not optics
    rows = pd.concat([splits["val"], splits["test"]]).set_index("image").loc[listed["image"]]
    real = list(iter_images(rows["path"], predictor.decode))
    ham = splits["test"].loc[splits["test"]["origin"] == "HAM10000"].sample(n=120, random_state=0)
    framed = [vignette_image(im, (1.0, 1.1, 1.2)[i % 3])
              for i, im in enumerate(iter_images(ham["path"], predictor.decode))]  # fmt: skip
    stats = loaded.trust["ood"]
    refused = {}
    for name, images in (("real", real), ("framed", framed)):
        features, logits = extract_features(predictor, images, 64)
        passed = [predictor.assess(im).ok for im in images]
        assert all(passed), name  # the quality checks never trip on them
        refused[name] = ood_scores(stats, features, logits) > stats["threshold"]
    vignettes = (listed["kind"] == "vignette").to_numpy()
    assert refused["framed"].mean() <= 0.05, refused["framed"].mean()
    assert refused["real"][vignettes].mean() <= 0.05, refused["real"][vignettes].mean()
    assert refused["real"][~vignettes].mean() <= 0.25, refused["real"][~vignettes].mean()
