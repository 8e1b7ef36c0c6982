"""BYOL self-supervised pretraining (jobs/pretrain_byol.py): a variant of the Ray Train job.

What it adds to `TrainingJob`: unlabelled images from folders or shards (labels ignored) as a
two-view stream, `BYOLModule`, a `backbone.pt` per checkpoint, and the latest one copied to
`<storage>/<name>/backbone.pt` (what `jobs/train.py --pretrain-ckpt` loads).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import ray
import ray.data
import ray.train

from dermanet.data.images import IMAGE_EXTENSIONS
from dermanet.data.pipelines import read_image_folders
from dermanet.data.sources import DataLocation, split_rows
from dermanet.storage import copy_file, is_uri, join
from dermanet.train.byol_module import BYOLModule
from dermanet.train.job import (
    METRICS_CSV,
    JobData,
    TrainingJob,
    epochs_completed,
    finite_metrics,
    latest_checkpoint,
)
from dermanet.train.settings import PretrainSettings
from dermanet.train.supervised import module_settings

log = logging.getLogger(__name__)
BACKBONE_FILE = "backbone.pt"
CURVES_PNG = "byol_curves.png"


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


def load_images(settings: PretrainSettings) -> tuple[ray.data.Dataset, int, str]:
    """Raw unlabelled rows, how many there are (sets the schedules' length) and their source."""
    if settings.shards:
        splits = list(dict.fromkeys(settings.shard_splits))
        rows = split_rows(
            DataLocation(shards=settings.shards), splits, exclude_origins=settings.exclude_origins
        )
        source, size = rows.dataset, len(rows)
        left_out = ", ".join(settings.exclude_origins)
        without = f"; without {left_out}" if left_out else ""
        where = f"shards {settings.shards} (splits {', '.join(splits)}{without}; labels ignored)"
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
    return source, size, where


class ByolJob(TrainingJob):
    """BYOL on a two-view stream; exports the online backbone."""

    kind = "pretrain_byol"
    settings_type = PretrainSettings
    train_mode = "two_view"
    curves = ("train/loss_epoch", "train/embedding_std_epoch", "train/momentum", "train/lr")
    curves_png = CURVES_PNG
    seed_per_rank = False  # identical online/target weights on every rank
    settings: PretrainSettings

    def load_data(self) -> JobData:
        source, size, where = load_images(self.settings)
        log.info("BYOL pretraining on %d images from %s", size, where)
        return JobData(
            sources={"train": source},
            train_images=size,
            description=where,
            provenance={"images": size},
        )

    def optimizer_steps_per_epoch(self, batches_per_epoch: int) -> int:
        return batches_per_epoch // self.settings.accumulate_grad_batches

    def trainer_options(self) -> dict[str, Any]:
        return {"accumulate_grad_batches": self.settings.accumulate_grad_batches}

    def build_module(self, config: dict[str, Any]) -> pl.LightningModule:
        return BYOLModule(
            **module_settings(
                self.settings,
                BYOLModule,
                model_config=config["model_config"],
                warmup_steps=config["warmup_steps"],
                total_steps=config["total_steps"],  # a Ray Data iterator has no length
            )
        )

    def export(
        self, module: pl.LightningModule, folder: Path, metrics: dict[str, float],
        provenance: dict[str, Any],
    ) -> None:  # fmt: skip
        assert isinstance(module, BYOLModule)
        epoch_metrics = {k: v for k, v in metrics.items() if k.endswith("_epoch") or k == "epoch"}
        module.save_backbone(folder / BACKBONE_FILE, {**provenance, "metrics": epoch_metrics})

    def finish(self, result: ray.train.Result, output: str, log_dir: Path) -> PretrainOutcome:
        """Copy the latest backbone.pt out of Ray's checkpoint folder."""
        checkpoint = latest_checkpoint(result, output)
        target = join(output, BACKBONE_FILE)
        with checkpoint.as_directory() as folder:
            copy_file(Path(folder) / BACKBONE_FILE, target)
        epochs = epochs_completed(result, log_dir)
        log.info("backbone after %d epochs: %s", epochs, target)
        csv = log_dir / METRICS_CSV
        return PretrainOutcome(
            output=output,
            backbone=target,
            metrics_csv=csv if csv.is_file() else None,
            curves_png=log_dir / CURVES_PNG if csv.is_file() else None,
            final_metrics=finite_metrics(result.metrics),
            epochs_completed=epochs,
        )


def run_pretraining(settings: PretrainSettings) -> PretrainOutcome:
    """Run (or resume) BYOL pretraining; see `ByolJob`."""
    return ByolJob(settings).run()


__all__ = ["ByolJob", "PretrainOutcome", "PretrainSettings", "load_images", "run_pretraining"]
