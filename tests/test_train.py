"""Supervised training on Ray Train (2 CPU workers, synthetic data) and its metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import ray.cloudpickle
import torch

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import CatalogueError
from dermanet.eval.metrics import classification_metrics
from dermanet.inference import Predictor
from dermanet.inference.checkpoint import load_checkpoint
from dermanet.models import create_model
from dermanet.train.supervised import TrainSettings, run_training

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "dermanet_tiny.yaml")
_spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
evaluate_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_job)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # callbacks travel to workers


def test_metrics_match_a_hand_computation() -> None:
    labels = np.array([0, 0, 1, 1, 1, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],  # right
            [0.2, 0.5, 0.3],  # wrong (1), true class 2nd
            [0.1, 0.8, 0.1],  # right
            [0.1, 0.6, 0.3],  # right
            [0.5, 0.1, 0.4],  # wrong (0), true class 3rd
            [0.3, 0.3, 0.4],  # right
        ]
    )
    m = classification_metrics(probs, labels, class_names=("A", "B", "C"))
    assert m["top1"] == pytest.approx(4 / 6)
    assert m["recall_A"] == pytest.approx(1 / 2)
    assert m["recall_B"] == pytest.approx(2 / 3)
    assert m["recall_C"] == pytest.approx(1.0)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    # F1: A tp1 fp1 fn1 -> 0.5; B tp2 fp1 fn1 -> 2/3; C tp1 fp0 fn0 -> 1
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    # AUROC for A: positives {0.7, 0.2} vs negatives {0.1, 0.1, 0.5, 0.3}: 4 + 2 of 8 pairs
    assert m["auroc_A"] == pytest.approx(6 / 8)
    assert m["top5"] == 1.0  # 3 classes: the top 5 always holds the truth


def test_balanced_accuracy_agrees_with_the_official_isic_scorer() -> None:
    from dermanet.eval.isic_scorer import official_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASS_NAMES), 200)
    logits = rng.normal(size=(200, len(CLASS_NAMES))) + 2.0 * np.eye(len(CLASS_NAMES))[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    score = official_score([f"ISIC_{i:07d}" for i in range(200)], labels, probs)
    ours = classification_metrics(probs, labels)
    assert ours["balanced_accuracy"] == pytest.approx(score.overall, abs=1e-9)


class RecordEpochStarts(pl.Callback):
    """Appends each epoch as it starts (rank 0): a resumed or retried run must repeat none.

    metrics.csv keeps one row per epoch, so it cannot show an epoch that ran twice.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{trainer.current_epoch}\n")


class KillOnce(pl.Callback):
    """Fault injection: SIGKILL rank 1 once, at the start of epoch 2, a few seconds after
    epoch 1 was reported.

    Ray Train's controller collects reports every 2 s and registers a checkpoint once it has
    every rank's report; a worker killed within that window loses that epoch's checkpoint
    (redone after the retry). The pause keeps this test about the retry, not that window.
    """

    def __init__(self, marker: str):
        self.marker = marker

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        first_time = not os.path.exists(self.marker)
        if trainer.current_epoch == 2 and trainer.global_rank == 1 and first_time:
            time.sleep(6)
            Path(self.marker).write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope="module")
def synthetic_train_data(tmp_path_factory) -> Path:
    from dermanet.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("train-data")
    generate_synthetic_dataset(root, num_images=320, size=64, seed=5)
    return root


def _settings(data: Path, storage: Path, **overrides) -> TrainSettings:
    base = {
        "csv": str(data / "metadata.csv"),
        "images": str(data / "images"),
        "model_config": TINY,
        "img_size": 48,
        "batch_size": 16,
        "lr": 3e-3,
        "epochs": 4,
        "storage_path": str(storage),
        "name": "synthetic",
        "num_workers": 2,
    }
    return TrainSettings(**{**base, **overrides})


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_train_learns_checkpoints_and_resumes(
    ray_local, synthetic_train_data, tmp_path, monkeypatch
) -> None:
    starts = tmp_path / "starts.txt"
    record = [RecordEpochStarts(str(starts))]
    outcome = run_training(_settings(synthetic_train_data, tmp_path, extra_callbacks=record))
    history = pd.read_csv(Path(outcome.output) / "logs" / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    losses = history["train/loss_epoch"].tolist()
    assert losses[-1] < losses[0] and min(losses) < 0.85 * losses[0], f"loss did not fall: {losses}"
    assert outcome.best_metrics["val/balanced_accuracy"] > 0.25  # chance is 0.125
    assert (Path(outcome.output) / "logs" / "training_curves.png").is_file()
    assert (Path(outcome.output) / "logs" / "confusion_matrix" / "epoch_003.png").is_file()

    # The exported checkpoint needs neither Ray nor Lightning and gives the trained logits.
    loaded = load_checkpoint(outcome.last_checkpoint)
    lightning_ckpt = next(Path(outcome.output).glob("checkpoint_*/checkpoint.ckpt"), None)
    assert lightning_ckpt is not None
    newest = max(Path(outcome.output).glob("checkpoint_*/checkpoint.ckpt"), key=os.path.getmtime)
    state = torch.load(newest, map_location="cpu", weights_only=False)["state_dict"]
    reference = create_model(loaded.config).eval()
    reference.load_state_dict(
        {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    )
    x = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(loaded.model(x).logits, reference(x).logits)
    assert loaded.img_size == 48 and loaded.provenance["experiment"] == "synthetic"

    # jobs/evaluate.py scores it, fits a temperature on val and exports a servable checkpoint.
    report_dir, shipped = tmp_path / "eval", tmp_path / "registry" / "shipped.pt"
    data = synthetic_train_data
    code = evaluate_job.main(
        ["--checkpoint", str(outcome.best_checkpoint), "--csv", str(data / "metadata.csv"),
         "--images", str(data / "images"), "--output", str(report_dir), "--tta",
         "--export", str(shipped), "--half", "--served-views", "flips",
         "--ood-method", "combined", "--ood-fpr", "0.1"]
    )  # fmt: skip
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["images"] == len(pd.read_csv(report_dir / "predictions.csv"))
    assert report["temperature"] > 0 and 0 <= report["ece_after"] <= 1
    for name in ("report.md", "confusion_matrix.png", "roc_curves.png", "truth.csv"):
        assert (report_dir / name).is_file()
    exported = load_checkpoint(shipped)
    assert exported.temperature == pytest.approx(report["temperature"])
    assert exported.metrics["test_balanced_accuracy"] == pytest.approx(
        report["official"]["balanced_accuracy"]
    )
    assert exported.provenance["exported_from"] == str(outcome.best_checkpoint)
    assert exported.tta == "flips" == report["served_views"] and "served" not in report
    gate = exported.trust["ood"]  # the gate asked for, its threshold set on val (per class)
    assert gate["method"] == "combined" and 0 <= gate["val_rejection_rate"] <= 0.1
    assert evaluate_job.main(["--checkpoint", str(shipped), "--output", str(report_dir)]) == 2
    flags = ["--csv", str(data / "metadata.csv"), "--images", str(data / "images")]
    bad_export = ["--checkpoint", str(shipped), *flags, "--output", str(tmp_path), "--export", "m"]
    assert evaluate_job.main(bad_export) == 2
    gate_without_export = [*flags, "--checkpoint", str(shipped), "--output", str(tmp_path)]
    assert evaluate_job.main([*gate_without_export, "--ood-method", "knn"]) == 2
    # Scoring the shipped file on val (nothing to refit on) reports what the server returns:
    # its stored temperature, and the sets and gate fitted with it.
    val_dir = tmp_path / "eval-val"
    shipped_val = ["--checkpoint", str(shipped), *flags, "--split", "val", "--output", str(val_dir)]
    assert evaluate_job.main(shipped_val) == 0
    val_report = json.loads((val_dir / "report.json").read_text())
    assert val_report["temperature"] == pytest.approx(exported.temperature)
    assert val_report["served_views"] == "flips" and val_report["settings"]["tta"] is None
    # ... and its probabilities are the server's (the same four views, averaged)
    scored = pd.read_csv(val_dir / "predictions.csv").head(8)
    served = Predictor(exported)
    images = [served.decode((data / "images" / f"{i}.jpg").read_bytes()) for i in scored.image]
    np.testing.assert_allclose(
        served.probabilities(images), scored[list(CLASS_NAMES)].to_numpy(), atol=1e-4
    )
    assert "sets" in val_report["trust"] and "quality_rejected" in val_report["trust"]

    # Re-running the same experiment with more epochs continues at epoch 4: none lost or repeated.
    resumed = run_training(
        _settings(synthetic_train_data, tmp_path, epochs=6, extra_callbacks=record)
    )
    history = pd.read_csv(Path(resumed.output) / "logs" / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3, 4, 5]
    assert starts.read_text().split() == ["0", "1", "2", "3", "4", "5"]
    assert resumed.epochs_completed == 6
    assert history["step"].is_monotonic_increasing

    # --init-checkpoint warm-starts every weight (head included) at another resolution: with a
    # vanishing learning rate the new run's weights are the old run's. The path is relative to
    # the driver's folder, as a user types it: the workers, elsewhere, must still find it.
    monkeypatch.chdir(Path(outcome.best_checkpoint).parent)
    warm = run_training(
        _settings(
            synthetic_train_data, tmp_path, name="warm", img_size=64, epochs=1, lr=1e-12,
            warmup_epochs=0, init_checkpoint=Path(outcome.best_checkpoint).name,
        )
    )  # fmt: skip
    started, warmed = (
        load_checkpoint(outcome.best_checkpoint),
        load_checkpoint(warm.last_checkpoint),
    )
    assert warmed.img_size == 64
    assert warmed.provenance["init_checkpoint"].endswith("best.pt")
    for name, weight in started.model.named_parameters():
        torch.testing.assert_close(
            dict(warmed.model.named_parameters())[name], weight, atol=1e-6, rtol=0
        )
    with pytest.raises(ValueError, match="another model config"):
        run_training(
            _settings(
                synthetic_train_data, tmp_path, name="warm-wrong",
                init_checkpoint=str(outcome.best_checkpoint),
                model_config=str(REPO / "configs" / "dermanet_small.yaml"),
            )
        )  # fmt: skip


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_killed_worker_is_retried_from_checkpoint(
    ray_local, synthetic_train_data, tmp_path
) -> None:
    from dermanet.inference.checkpoint import save_backbone

    backbone = create_model(TINY)
    save_backbone(tmp_path / "backbone.pt", backbone.config, backbone.backbone_state_dict())
    marker = tmp_path / "killed.txt"
    starts = tmp_path / "starts.txt"
    outcome = run_training(
        _settings(
            synthetic_train_data,
            tmp_path,
            name="fault",
            epochs=3,
            max_failures=2,
            pretrain_ckpt=str(tmp_path / "backbone.pt"),
            extra_callbacks=[KillOnce(str(marker)), RecordEpochStarts(str(starts))],
        )
    )
    assert marker.read_text() == "killed"  # a worker really died mid-run
    history = pd.read_csv(Path(outcome.output) / "logs" / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1, 2]  # and the run still did every epoch
    # The interrupted epoch 2 is redone from epoch 1's checkpoint; no finished epoch repeats.
    assert starts.read_text().split() == ["0", "1", "2", "2"]
    assert outcome.epochs_completed == 3
    assert (
        load_checkpoint(outcome.best_checkpoint).provenance["pretrain_ckpt"].endswith("backbone.pt")
    )


def test_weighted_smoothed_loss_weights_each_sample_by_its_own_class() -> None:
    from dermanet.train.classifier_module import weighted_smoothed_cross_entropy

    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    weights = torch.tensor([0.2, 1.0, 5.0, 13.0])
    # No smoothing: exactly PyTorch's class-weighted cross-entropy.
    torch.testing.assert_close(
        weighted_smoothed_cross_entropy(logits, labels, weights, 0.0),
        torch.nn.functional.cross_entropy(logits, labels, weight=weights),
    )
    # Equal weights: exactly PyTorch's label smoothing.
    torch.testing.assert_close(
        weighted_smoothed_cross_entropy(logits, labels, torch.ones(4), 0.1),
        torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1),
    )
    # A lone sample's loss does not depend on the other classes' weights (PyTorch's does).
    one = (logits[:1], labels[:1])
    unweighted = weighted_smoothed_cross_entropy(*one, torch.ones(4), 0.1)
    torch.testing.assert_close(weighted_smoothed_cross_entropy(*one, weights, 0.1), unweighted)


def test_epoch_line_shows_validation_only_on_epochs_that_validated() -> None:
    """With --val-every 2, an epoch without validation must not repeat the last one's numbers."""
    from types import SimpleNamespace

    from dermanet.train.console import epoch_summary
    from dermanet.train.reporting import epoch_metrics

    # What Lightning's callback_metrics holds after a skipped validation: the last val values.
    trainer = SimpleNamespace(callback_metrics={
        "train/loss_epoch": torch.tensor(1.2758), "val/loss": torch.tensor(1.1897),
        "val/balanced_accuracy": torch.tensor(0.6342), "val/macro_auroc": torch.tensor(0.9214),
        "perf/train_images_per_sec": torch.tensor(16.0),
    })  # fmt: skip
    skipped, validated = (
        SimpleNamespace(validated_this_epoch=False),
        SimpleNamespace(validated_this_epoch=True),
    )
    line = epoch_summary(2, 16, epoch_metrics(trainer, skipped), 587.0)
    assert line == "epoch 3/16 · loss 1.2758 · 16 img/s · 587 s"
    line = epoch_summary(3, 16, epoch_metrics(trainer, validated), 552.0)
    assert "val bal-acc 0.6342 · AUROC 0.9214" in line
    trainer.callback_metrics["train/loss_epoch"] = torch.tensor(float("nan"))
    assert "loss nan" in epoch_summary(4, 16, epoch_metrics(trainer, skipped), 500.0)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_source_rebalancing_without_origins_says_what_is_missing(
    ray_local, synthetic_train_data, tmp_path
) -> None:
    """--origin-sampling-power on a catalogue with no `origin` column stops in the driver,
    before any worker starts, with what to do."""
    plain = tmp_path / "no-origin.csv"
    pd.read_csv(synthetic_train_data / "metadata.csv").drop(columns="origin").to_csv(
        plain, index=False
    )
    settings = _settings(
        synthetic_train_data, tmp_path, csv=str(plain), name="no-origin", origin_sampling_power=0.5
    )
    with pytest.raises(CatalogueError, match="--origin-sampling-power needs an `origin` column"):
        run_training(settings)
    assert not (tmp_path / "no-origin").exists()
