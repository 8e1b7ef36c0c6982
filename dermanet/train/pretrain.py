"""BYOL self-supervised pretraining on Ray Train: the per-worker loop and the driver.

Driver (jobs/pretrain_byol.py): unlabelled images from image folders or prepared shards
(labels ignored) become a Ray Data two-view pipeline; a `TorchTrainer` runs `BYOLModule` on
N workers with Ray's DDP strategy. Each epoch reports loss / embedding std / momentum / LR /
throughput and a checkpoint whose folder holds the Lightning state (for resuming) and
`backbone.pt` (the online backbone). At the end the latest `backbone.pt` is copied to
`<storage>/<name>/backbone.pt`, what `jobs/train.py --pretrain-ckpt` loads.

Everything Ray-Train-generic (run folder, Lightning Trainer, resume, retries) is shared with
the supervised job through `dermanet.train.ray_common`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import ray
import ray.data
import ray.train
from ray.train import CheckpointConfig

from dermanet.data.catalogue import SPLITS
from dermanet.data.images import IMAGE_EXTENSIONS
from dermanet.data.pipelines import (
    NormalizedBatches,
    PipelineConfig,
    build_pipeline,
    read_image_folders,
    read_shards,
)
from dermanet.data.shards import read_manifest
from dermanet.models import DEFAULT_CONFIG_PATH, ModelConfig
from dermanet.storage import copy_file, is_uri, join
from dermanet.train.byol_module import BYOLModule
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
from dermanet.train.reporting import RayTrainReporter
from dermanet.train.throughput import EpochThroughput

log = logging.getLogger(__name__)
BACKBONE_FILE = "backbone.pt"
CURVES_PNG = "byol_curves.png"
CURVES = ("train/loss_epoch", "train/embedding_std_epoch", "train/momentum", "train/lr")
OPTIMIZERS = ("adamw", "lars")


@dataclass
class PretrainSettings:
    """Everything jobs/pretrain_byol.py accepts. Data: `data_dirs`, or `shards`."""

    data_dirs: list[str] = field(default_factory=list)
    shards: str | None = None
    shard_splits: list[str] = field(default_factory=lambda: list(SPLITS))
    img_size: int = 128
    batch_size: int = 64
    max_epochs: int = 100
    lr: float = 3e-4
    weight_decay: float = 1e-4
    base_momentum: float = 0.996
    optimizer: str = "adamw"
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    sync_batchnorm: bool = False
    proj_hidden_dim: int = 4096
    proj_out_dim: int = 256
    pred_hidden_dim: int = 4096
    model_config: str = str(DEFAULT_CONFIG_PATH)
    precision: str = "32-true"
    seed: int = 42
    storage_path: str = "outputs"
    name: str = "dermanet-byol"
    log_dir: str | None = None
    on_nan: str = "stop"
    histogram_every_n_steps: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    data_cpus: float = 1.0
    max_failures: int = 1
    extra_callbacks: list[Any] = field(default_factory=list)  # tests inject faults with this

    def validate(self) -> None:
        """Reject bad input before Ray starts, with the flag to change in the message."""
        if bool(self.data_dirs) == bool(self.shards):
            raise ValueError("give either --data-dirs (image folders) or --shards, not both/none")
        unknown = sorted(set(self.shard_splits) - set(SPLITS))
        if unknown or not self.shard_splits:
            raise ValueError(f"--shard-splits takes some of {SPLITS}, got {self.shard_splits}")
        for folder in self.data_dirs:
            if not is_uri(folder) and not Path(folder).expanduser().is_dir():
                raise FileNotFoundError(f"--data-dirs: {folder} is not a folder")
        if not Path(self.model_config).is_file():
            raise FileNotFoundError(f"--model-config: {self.model_config} does not exist")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.on_nan not in ("stop", "skip"):
            raise ValueError(f"--on-nan must be 'stop' or 'skip', got {self.on_nan!r}")
        checks = {
            "--max-epochs >= 1": self.max_epochs >= 1,
            # BatchNorm (backbone and BYOL heads) needs two samples per view.
            "--batch-size >= 2": self.batch_size >= 2,
            "--num-workers >= 1": self.num_workers >= 1,
            "--img-size >= 32": self.img_size >= 32,
            "--accumulate-grad-batches >= 1": self.accumulate_grad_batches >= 1,
            "0 <= --warmup-epochs <= --max-epochs": 0 <= self.warmup_epochs <= self.max_epochs,
            "0 <= --base-momentum <= 1": 0.0 <= self.base_momentum <= 1.0,
            "--lr > 0": self.lr > 0,
            "--weight-decay >= 0 and --grad-clip >= 0": self.weight_decay >= 0
            and self.grad_clip >= 0,
            "--histogram-every-n-steps >= 0": self.histogram_every_n_steps >= 0,
            "projector/predictor sizes >= 1": min(
                self.proj_hidden_dim, self.proj_out_dim, self.pred_hidden_dim
            )
            >= 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid settings, need: {'; '.join(failed)}")


@dataclass
class PretrainOutcome:
    """Where a finished run left its artefacts, and its last epoch's metrics."""

    output: str
    backbone: str
    metrics_csv: Path | None
    curves_png: Path | None
    final_metrics: dict[str, float]
    epochs_completed: int


def count_images(folders: list[str]) -> int:
    """Image files under local folders (recursive, as `read_image_folders` finds them)."""
    suffixes = tuple(IMAGE_EXTENSIONS)
    total = 0
    for folder in folders:
        for _, _, files in os.walk(Path(folder).expanduser()):
            total += sum(name.lower().endswith(suffixes) for name in files)
    return total


def load_images(settings: PretrainSettings) -> tuple[ray.data.Dataset, int]:
    """Raw (undecoded) unlabelled rows and how many there are (sets the schedules' length)."""
    if settings.shards:
        manifest = read_manifest(settings.shards)
        splits = list(dict.fromkeys(settings.shard_splits))
        sources = [read_shards(settings.shards, split) for split in splits]
        source = sources[0].union(*sources[1:]) if len(sources) > 1 else sources[0]
        size = sum(sum(manifest["counts"][split].values()) for split in splits)
        where = f"shards {settings.shards} (splits {', '.join(splits)}; labels ignored)"
    else:
        source = read_image_folders(list(settings.data_dirs))
        if all(not is_uri(folder) for folder in settings.data_dirs):
            size = count_images(settings.data_dirs)
        else:
            log.info("counting the images under %s (one listing pass)", settings.data_dirs)
            size = source.count()
        where = f"image folders {', '.join(settings.data_dirs)}"
    if size == 0:
        raise ValueError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}; check the path"
        )
    log.info("BYOL pretraining on %d images from %s", size, where)
    return source, size


def _save_backbone_into(provenance: dict[str, Any]):
    """The reporter's export hook: a checkpoint folder holds backbone.pt, not a classifier."""

    def export(module: pl.LightningModule, folder: Path, metrics: dict[str, float]) -> None:
        epoch_metrics = {k: v for k, v in metrics.items() if k.endswith("_epoch") or k == "epoch"}
        module.save_backbone(folder / BACKBONE_FILE, {**provenance, "metrics": epoch_metrics})

    return export


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: BYOL over this worker's shard of the two-view stream."""
    settings = PretrainSettings(**config["settings"])
    # Same seed on every rank: identical initial online/target weights (DDP broadcasts them
    # anyway; the target copy must match the online network it was copied from).
    pl.seed_everything(settings.seed, workers=True)
    module = BYOLModule(
        model_config=config["model_config"],
        proj_hidden_dim=settings.proj_hidden_dim,
        proj_out_dim=settings.proj_out_dim,
        pred_hidden_dim=settings.pred_hidden_dim,
        optimizer=settings.optimizer,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_steps=config["warmup_steps"],
        total_steps=config["total_steps"],  # a Ray Data iterator has no length
        base_momentum=settings.base_momentum,
        sync_batchnorm=settings.sync_batchnorm,
    )
    log_dir = Path(config["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    callbacks: list[pl.Callback] = [
        EpochThroughput(),  # before the reporter, which reads what it logs
        RayTrainReporter(
            img_size=settings.img_size,
            provenance=config["provenance"],
            metrics_csv=str(log_dir / METRICS_CSV),
            export_fn=_save_backbone_into(config["provenance"]),
        ),
        GradientMonitor(
            log_dir / "nan_dumps",
            on_nan=settings.on_nan,
            log_every_n_steps=10,
            histogram_every_n_steps=settings.histogram_every_n_steps,
        ),
        *settings.extra_callbacks,
    ]
    trainer = lightning_trainer(
        max_epochs=settings.max_epochs,
        use_gpu=settings.use_gpu,
        precision=settings.precision,
        grad_clip=settings.grad_clip,
        callbacks=callbacks,
        log_dir=log_dir,
        accumulate_grad_batches=settings.accumulate_grad_batches,
    )
    batches = NormalizedBatches(
        ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=settings.batch_size,
            drop_last=True,  # BatchNorm fails on a last batch of 1
            local_shuffle_buffer_size=settings.batch_size * 8,
            local_shuffle_seed=settings.seed,
            device="auto",
        )
    )
    trainer.fit(module, train_dataloaders=batches, ckpt_path=resume_checkpoint_path())


def run_pretraining(settings: PretrainSettings) -> PretrainOutcome:
    """Build and run the TorchTrainer; export backbone.pt, metrics.csv and byol_curves.png."""
    settings.validate()
    settings = dataclasses.replace(
        settings, precision=resolve_precision(settings.precision, settings.use_gpu)
    )
    source, size = load_images(settings)
    pipeline = PipelineConfig(img_size=settings.img_size, num_cpus=settings.data_cpus / 2)
    datasets = {"train": build_pipeline(source, "two_view", pipeline)}
    batches_per_epoch = size // (settings.batch_size * settings.num_workers)
    if batches_per_epoch < 1:
        raise ValueError(
            f"{size} images give no full batch of {settings.batch_size} on each of "
            f"{settings.num_workers} workers; lower --batch-size or --num-workers"
        )
    steps_per_epoch = max(1, batches_per_epoch // settings.accumulate_grad_batches)
    output = experiment_dir(settings.storage_path, settings.name)
    model_config = ModelConfig.from_yaml(settings.model_config).to_dict()
    provenance = {
        "job": "pretrain_byol",
        "experiment": settings.name,
        "data": settings.shards or list(settings.data_dirs),
        "images": size,
        "settings": plain_settings(settings),
    }
    config = {
        "settings": {**plain_settings(settings), "extra_callbacks": settings.extra_callbacks},
        "model_config": model_config,
        "warmup_steps": int(settings.warmup_epochs * steps_per_epoch),
        "total_steps": steps_per_epoch * settings.max_epochs,
        "log_dir": str(local_log_dir(output, settings.log_dir)),
        "provenance": provenance,
    }
    log.info(
        "%d optimiser steps/epoch (%d workers x batch %d x accumulate %d), %d epochs; "
        "run folder %s",
        steps_per_epoch, settings.num_workers, settings.batch_size,
        settings.accumulate_grad_batches, settings.max_epochs, output,
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
        checkpoint_config=CheckpointConfig(num_to_keep=2),  # the latest ones
    )
    result = trainer.fit()
    return _export(result, output, Path(config["log_dir"]))


def _export(result: ray.train.Result, output: str, log_dir: Path) -> PretrainOutcome:
    """Copy the latest backbone.pt out of Ray's checkpoint folder; plot the curves."""
    checkpoint = raise_on_failure(result, output)
    target = join(output, BACKBONE_FILE)
    with checkpoint.as_directory() as folder:
        copy_file(Path(folder) / BACKBONE_FILE, target)
    curves = plot_history(log_dir, list(CURVES), CURVES_PNG)
    csv = log_dir / METRICS_CSV
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
    epochs = int(metrics.get("epoch", -1)) + 1
    if csv.is_file():
        epochs = max(epochs, int(pd.read_csv(csv)["epoch"].max()) + 1)
    log.info("backbone after %d epochs: %s", epochs, target)
    return PretrainOutcome(
        output=output,
        backbone=target,
        metrics_csv=csv if csv.is_file() else None,
        curves_png=curves,
        final_metrics=metrics,
        epochs_completed=epochs,
    )


__all__ = ["PretrainOutcome", "PretrainSettings", "load_images", "run_pretraining"]
