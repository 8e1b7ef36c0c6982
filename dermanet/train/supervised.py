"""Supervised fine-tuning (jobs/train.py): the classifier variant of the Ray Train job template.

What it adds to `TrainingJob`: labelled train/val rows with class weights (and optional class
resampling), `ClassifierModule`, a `model.pt` per checkpoint, and `best.pt` / `last.pt` at the
end. Everything else (workers, resume, retries, logs, console) is the template's.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import ray
import ray.train
from ray.train import CheckpointConfig

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import CatalogueError
from dermanet.data.pipelines import sampling_repeats
from dermanet.data.sources import require_origins, split_rows
from dermanet.data.splits import class_weights_from_counts
from dermanet.inference.checkpoint import (
    CheckpointError,
    load_backbone_file,
    load_checkpoint,
    read_checkpoint_dict,
    save_checkpoint,
)
from dermanet.settings import load_settings_yaml as _load_yaml
from dermanet.storage import copy_file, join
from dermanet.train.classifier_module import ClassifierModule
from dermanet.train.job import (
    JobData,
    TrainingJob,
    early_stopping,
    epochs_completed,
    finite_metrics,
    latest_checkpoint,
    monitor_mode,
    relative_location,
)
from dermanet.train.reporting import MODEL_FILE
from dermanet.train.settings import TrainSettings

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """Where a finished run left its artefacts, and its best validation metrics."""

    output: str
    best_checkpoint: str
    last_checkpoint: str
    best_metrics: dict[str, float]
    epochs_completed: int


def check_warm_start(path: str, model_config: dict[str, Any], settings: TrainSettings) -> None:
    """Refuse, before any worker starts, a --init-checkpoint this run cannot continue from."""
    try:
        data = read_checkpoint_dict(path, mmap=True)
    except (FileNotFoundError, CheckpointError) as exc:
        raise ValueError(f"--init-checkpoint: {exc}") from None

    def shape(config: dict[str, Any]) -> dict[str, Any]:  # dropout changes no weight
        return {k: v for k, v in config.items() if k != "dropout"}

    if shape(dict(data["model_config"])) != shape(model_config):
        raise ValueError(
            f"--init-checkpoint {path} was trained with another model config than "
            f"--model-config {settings.model_config}; pass the config it was trained with"
        )
    theirs = str((data.get("preprocessing") or {}).get("color_constancy", "none"))
    if theirs != settings.color_constancy:
        raise ValueError(
            f"--init-checkpoint {path} was trained with --color-constancy {theirs}, this run "
            f"with {settings.color_constancy}; use the same"
        )


class SupervisedJob(TrainingJob):
    """Fine-tune DermResNetSE on labelled images; export best.pt and last.pt."""

    kind = "train"
    settings_type = TrainSettings
    curves = ("val/balanced_accuracy", "val/macro_auroc", "val/loss", "train/loss_epoch")
    settings: TrainSettings

    def load_data(self) -> JobData:
        s = self.settings
        if s.init_checkpoint:
            check_warm_start(s.init_checkpoint, self.model_config(), s)
        location = s.location
        rows = {
            split: split_rows(location, split, exclude_origins=s.exclude_origins)
            for split in ("train", "val")
        }
        counts = rows["train"].counts()
        weights = class_weights_from_counts(counts) ** s.class_weight_power
        log.info(
            "training on %d images (val %d); class weights %s",
            len(rows["train"]), len(rows["val"]),
            {c: round(float(w), 2) for c, w in zip(CLASS_NAMES, weights, strict=True)},
        )  # fmt: skip
        table = rows["train"].table
        if s.origin_sampling_power > 0:
            require_origins(table, "--origin-sampling-power")
        repeats = sampling_repeats(table, s.sampling_power, s.origin_sampling_power)
        if repeats is not None:
            copies = pd.Series(repeats).reindex(table.index)
            share = copies / len(table)
            names = table["label_index"].map(dict(enumerate(CLASS_NAMES)))
            log.info(
                "an epoch draws: classes %s, sources %s; one image at most %.1f times",
                share.groupby(names).sum().round(3).to_dict(),
                share.groupby(table["origin"]).sum().round(3).to_dict(),
                copies.max(),
            )
        return JobData(
            sources={split: r.dataset for split, r in rows.items()},
            train_images=len(rows["train"]),
            description=location.describe(),
            worker_config={"class_weights": weights.tolist()},
            repeats=repeats,
        )

    def model_config(self) -> dict[str, Any]:
        config = super().model_config()
        if self.settings.dropout is not None:
            config["dropout"] = self.settings.dropout
        return config

    def provenance(self) -> dict[str, Any]:
        return {
            "pretrain_ckpt": relative_location(self.settings.pretrain_ckpt),
            "init_checkpoint": relative_location(self.settings.init_checkpoint),
        }

    def build_module(self, config: dict[str, Any]) -> pl.LightningModule:
        module = ClassifierModule(
            **module_settings(
                self.settings,
                ClassifierModule,
                model_config=config["model_config"],
                class_weights=config["class_weights"],
                warmup_steps=config["warmup_steps"],
                total_steps=config["total_steps"],
            )
        )
        s = self.settings
        if s.pretrain_ckpt:
            _, state = load_backbone_file(s.pretrain_ckpt)
            report = module.model.load_backbone(state)
            if ray.train.get_context().get_world_rank() == 0:
                log.warning("--pretrain-ckpt %s: %s", s.pretrain_ckpt, report.summary())
        if s.init_checkpoint:
            # Every weight, head included; a resume then overwrites them with the run's own state.
            state = load_checkpoint(s.init_checkpoint).model.state_dict()
            module.model.load_state_dict(state, strict=True)
        if module.ema_model is not None and (s.pretrain_ckpt or s.init_checkpoint):
            module.ema_model.load_state_dict(module.model.state_dict())  # average from there
        return module

    def required_metrics(self) -> tuple[str, ...]:
        return (self.settings.monitor,)

    def worker_callbacks(self, config: dict[str, Any]) -> list[pl.Callback]:
        return early_stopping(self.settings)

    def trainer_options(self) -> dict[str, Any]:
        return {"check_val_every_n_epoch": self.settings.val_every}

    def export(
        self, module: pl.LightningModule, folder: Path, metrics: dict[str, float],
        provenance: dict[str, Any],
    ) -> None:  # fmt: skip
        assert isinstance(module, ClassifierModule)
        save_checkpoint(
            folder / MODEL_FILE,
            module.inference_model(),
            img_size=self.settings.img_size,
            metrics=metrics,
            provenance=provenance,
            preprocessing=self.settings.preprocessing(),
        )

    def checkpoint_config(self) -> CheckpointConfig:
        return CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=self.settings.monitor,
            checkpoint_score_order=monitor_mode(self.settings.monitor),
        )

    def finish(self, result: ray.train.Result, output: str, log_dir: Path) -> TrainOutcome:
        """Copy the best (by --monitor) and the latest model.pt out of Ray's checkpoints."""
        last = latest_checkpoint(result, output)
        monitor = self.settings.monitor
        scored = [(c, m) for c, m in result.best_checkpoints if monitor in m]
        pick = min if monitor_mode(monitor) == "min" else max
        best, best_metrics = (
            pick(scored, key=lambda cm: cm[1][monitor]) if scored else (last, result.metrics)
        )
        exports = {}
        for label, checkpoint in (("best", best), ("last", last)):
            target = join(output, f"{label}.pt")
            with checkpoint.as_directory() as folder:
                copy_file(Path(folder) / MODEL_FILE, target)
            exports[label] = target
        return TrainOutcome(
            output,
            exports["best"],
            exports["last"],
            finite_metrics(best_metrics),
            epochs_completed(result, log_dir),
        )


def module_settings(settings: Any, module_type: type, **given: Any) -> dict[str, Any]:
    """A LightningModule's arguments: `given` ones, the rest matched by name in the settings.

    A hyperparameter keeps one name from flag to module hparam, so it is never re-listed.
    """
    names = set(inspect.signature(module_type.__init__).parameters) - {"self"} - set(given)
    return {**{n: getattr(settings, n) for n in names if hasattr(settings, n)}, **given}


def run_training(
    settings: TrainSettings, run_callbacks: list[Any] | None = None, tracked: bool = True
) -> TrainOutcome:
    """Run (or resume) a supervised training job; see `SupervisedJob`."""
    return SupervisedJob(settings).run(run_callbacks, tracked)


def load_settings_yaml(path: str | Path) -> dict[str, Any]:
    """Training settings from YAML (e.g. jobs/tune.py's best_config.yaml), checked by name."""
    return _load_yaml(path, TrainSettings)


__all__ = [
    "CatalogueError",
    "SupervisedJob",
    "TrainOutcome",
    "TrainSettings",
    "load_settings_yaml",
    "run_training",
]
