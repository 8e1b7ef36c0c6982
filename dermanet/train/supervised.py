"""Supervised fine-tuning on Ray Train: the per-worker loop and the driver (jobs/train.py).

Driver: reads the data (shards or CSV + folder), computes class weights, builds Ray Data
pipelines and a `TorchTrainer`. Workers: a Lightning Trainer with Ray's DDP strategy, fed by
`ray.train.get_dataset_shard`. Each epoch reports metrics + a checkpoint; a rerun of the same
experiment, or a retried worker group (FailureConfig), resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import ray
import ray.train
from lightning.pytorch.callbacks import EarlyStopping
from ray.train import CheckpointConfig

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import CatalogueError
from dermanet.data.pipelines import (
    NormalizedBatches,
    PipelineConfig,
    build_pipeline,
    read_catalogue_files,
    read_shards,
)
from dermanet.data.readers import read_catalogue
from dermanet.data.shards import read_manifest
from dermanet.data.splits import assign_splits, class_weights_from_counts
from dermanet.models import DEFAULT_CONFIG_PATH, ModelConfig
from dermanet.storage import copy_file, join
from dermanet.train.classifier_module import ClassifierModule
from dermanet.train.monitor import GradientMonitor
from dermanet.train.ray_common import (
    METRICS_CSV,
    PRECISIONS,
    experiment_dir,
    lightning_trainer,
    local_log_dir,
    plain_settings,
    plot_history,
    raise_on_failure,
    resolve_precision,
    resume_checkpoint_path,
    torch_trainer,
)
from dermanet.train.reporting import MODEL_FILE, RayTrainReporter
from dermanet.train.throughput import EpochThroughput

log = logging.getLogger(__name__)
CURVES = ("val/balanced_accuracy", "val/macro_auroc", "val/loss", "train/loss_epoch")


@dataclass
class TrainSettings:
    """Everything jobs/train.py accepts. Data: `shards`, or `csv` + `images`."""

    shards: str | None = None
    csv: str | None = None
    images: str | None = None
    drop_missing: bool = False
    split_seed: int = 0
    model_config: str = str(DEFAULT_CONFIG_PATH)
    pretrain_ckpt: str | None = None
    img_size: int = 128
    batch_size: int = 32
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    aux_loss_weight: float = 0.0
    dropout: float | None = None
    precision: str = "32-true"
    grad_clip: float = 1.0
    early_stopping_patience: int = 0
    monitor: str = "val/balanced_accuracy"
    storage_path: str = "outputs"
    name: str = "dermanet-train"
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    data_cpus: float = 1.0
    max_failures: int = 1
    on_nan: str = "stop"
    extra_callbacks: list[Any] = field(default_factory=list)  # tests inject faults with this

    def validate(self) -> None:
        if (self.shards is None) == (self.csv is None):
            raise ValueError("give either --shards or --csv (with --images), not both or neither")
        if self.csv is not None and self.images is None:
            raise ValueError("--csv needs --images (the image folder)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 2 or self.num_workers < 1:
            raise ValueError("--epochs >= 1, --batch-size >= 2 and --num-workers >= 1 required")


def load_settings_yaml(path: str | Path) -> dict[str, Any]:
    """Training settings from YAML (e.g. jobs/tune.py's best_config.yaml), checked by name."""
    import yaml

    with open(path) as f:
        values = yaml.safe_load(f) or {}
    known = {f.name for f in dataclasses.fields(TrainSettings)} - {"extra_callbacks"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown training settings {unknown}")
    return values


@dataclass
class TrainOutcome:
    """Where a finished run left its artefacts, and its best validation metrics."""

    output: str
    best_checkpoint: str
    last_checkpoint: str
    best_metrics: dict[str, float]
    epochs_completed: int


def _load_data(settings: TrainSettings) -> tuple[dict[str, ray.data.Dataset], dict[str, int]]:
    """Raw (undecoded) train/val datasets and per-class training counts."""
    if settings.shards:
        manifest = read_manifest(settings.shards)
        counts = manifest["counts"]["train"]
        sources = {s: read_shards(settings.shards, s) for s in ("train", "val")}
        sizes = {s: sum(manifest["counts"][s].values()) for s in ("train", "val")}
    else:
        catalogue = read_catalogue(
            settings.csv, settings.images, missing="drop" if settings.drop_missing else "error"
        )
        if not catalogue["split"].isin(("train", "val", "test")).all():
            catalogue = assign_splits(catalogue, seed=settings.split_seed)
        counts = catalogue.loc[catalogue.split == "train", "label"].value_counts().to_dict()
        sources = {s: read_catalogue_files(catalogue, split=s) for s in ("train", "val")}
        sizes = catalogue["split"].value_counts().to_dict()
    return sources, {"weights": class_weights_from_counts(counts).tolist(), **sizes}


def _model_config(settings: TrainSettings) -> dict[str, Any]:
    config = ModelConfig.from_yaml(settings.model_config).to_dict()
    if settings.dropout is not None:
        config["dropout"] = settings.dropout
    return config


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    settings = TrainSettings(**config["settings"])
    pl.seed_everything(settings.seed + ray.train.get_context().get_world_rank(), workers=True)
    module = ClassifierModule(
        model_config=config["model_config"],
        class_weights=config["class_weights"],
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        optimizer=settings.optimizer,
        label_smoothing=settings.label_smoothing,
        aux_loss_weight=settings.aux_loss_weight,
        warmup_steps=config["warmup_steps"],
        total_steps=config["total_steps"],
    )
    if settings.pretrain_ckpt:
        from dermanet.models.byol import load_backbone_file

        _, state = load_backbone_file(settings.pretrain_ckpt)
        report = module.model.load_backbone(state)
        if ray.train.get_context().get_world_rank() == 0:
            log.warning("--pretrain-ckpt %s: %s", settings.pretrain_ckpt, report.summary())

    log_dir = Path(config["log_dir"])
    (log_dir / "confusion_matrix").mkdir(parents=True, exist_ok=True)
    callbacks: list[pl.Callback] = [
        EpochThroughput(),  # before the reporter, which reads what it logs
        RayTrainReporter(
            img_size=settings.img_size,
            provenance=config["provenance"],
            confusion_png_dir=str(log_dir / "confusion_matrix"),
            metrics_csv=str(log_dir / METRICS_CSV),
        ),
        GradientMonitor(log_dir / "nan_dumps", on_nan=settings.on_nan, log_every_n_steps=10),
        *settings.extra_callbacks,
    ]
    if settings.early_stopping_patience > 0:
        callbacks.append(
            EarlyStopping(settings.monitor, mode="max", patience=settings.early_stopping_patience)
        )
    trainer = lightning_trainer(
        max_epochs=settings.epochs,
        use_gpu=settings.use_gpu,
        precision=settings.precision,
        grad_clip=settings.grad_clip,
        callbacks=callbacks,
        log_dir=log_dir,
    )
    device_batches = {"device": "auto"}
    train_batches = NormalizedBatches(
        ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=settings.batch_size,
            drop_last=True,  # BatchNorm fails on a last batch of 1
            local_shuffle_buffer_size=settings.batch_size * 8,
            local_shuffle_seed=settings.seed,
            **device_batches,
        )
    )
    val_batches = NormalizedBatches(
        ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=settings.batch_size, **device_batches
        )
    )
    trainer.fit(module, train_dataloaders=train_batches, val_dataloaders=val_batches,
                ckpt_path=resume_checkpoint_path())  # fmt: skip


def run_training(settings: TrainSettings, run_callbacks: list[Any] | None = None) -> TrainOutcome:
    """Build and run the TorchTrainer; export best.pt and last.pt next to Ray's run folder.

    `run_callbacks` go to Ray's RunConfig (Ray Tune passes its TuneReportCallback here).
    """
    settings.validate()
    settings = dataclasses.replace(
        settings, precision=resolve_precision(settings.precision, settings.use_gpu)
    )
    sources, info = _load_data(settings)
    pipeline = PipelineConfig(img_size=settings.img_size, num_cpus=settings.data_cpus / 2)
    datasets = {
        "train": build_pipeline(sources["train"], "train", pipeline),
        "val": build_pipeline(sources["val"], "eval", pipeline),
    }
    steps_per_epoch = max(1, info["train"] // (settings.batch_size * settings.num_workers))
    output = experiment_dir(settings.storage_path, settings.name)
    provenance = {
        "job": "train",
        "experiment": settings.name,
        "data": settings.shards or settings.csv,
        "pretrain_ckpt": settings.pretrain_ckpt,
        "settings": plain_settings(settings),
    }
    config = {
        "settings": {**plain_settings(settings), "extra_callbacks": settings.extra_callbacks},
        "model_config": _model_config(settings),
        "class_weights": info["weights"],
        "warmup_steps": int(settings.warmup_epochs * steps_per_epoch),
        "total_steps": steps_per_epoch * settings.epochs,
        "log_dir": str(local_log_dir(output)),
        "provenance": provenance,
    }
    log.info(
        "training on %d images (val %d), %d steps/epoch, class weights %s",
        info["train"], info["val"], steps_per_epoch,
        dict(zip(CLASS_NAMES, np.round(info["weights"], 2), strict=True)),
    )  # fmt: skip
    trainer = torch_trainer(
        train_loop_per_worker,
        config,
        datasets,
        output=output,
        storage_path=settings.storage_path,
        name=settings.name,
        num_workers=settings.num_workers,
        use_gpu=settings.use_gpu,
        cpus_per_worker=settings.cpus_per_worker,
        max_failures=settings.max_failures,
        checkpoint_config=CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=settings.monitor,
            checkpoint_score_order="max",
        ),
        run_callbacks=run_callbacks,
    )
    result = trainer.fit()
    outcome = _export(result, output, settings.monitor)
    plot_history(Path(config["log_dir"]), list(CURVES), "training_curves.png")
    return outcome


def _export(result: ray.train.Result, output: str, monitor: str) -> TrainOutcome:
    """Copy the best and the latest model.pt out of Ray's checkpoint folders."""
    last = raise_on_failure(result, output)
    scored = [(c, m) for c, m in result.best_checkpoints if monitor in m]
    best, best_metrics = max(scored, key=lambda cm: cm[1][monitor]) if scored else (
        last, result.metrics or {},
    )  # fmt: skip
    paths = {}
    for label, checkpoint in (("best", best), ("last", last)):
        target = join(output, f"{label}.pt")
        with checkpoint.as_directory() as folder:
            copy_file(Path(folder) / MODEL_FILE, target)
        paths[label] = target
    metrics = {k: float(v) for k, v in best_metrics.items() if isinstance(v, int | float)}
    last_epoch = int((result.metrics or {}).get("epoch", -1)) + 1
    return TrainOutcome(output, paths["best"], paths["last"], metrics, last_epoch)


__all__ = ["CatalogueError", "TrainOutcome", "TrainSettings", "run_training"]
