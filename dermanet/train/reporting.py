"""Lightning callback that hands each epoch to Ray Train: metrics + a checkpoint directory.

Every checkpoint directory holds:
    checkpoint.ckpt        full Lightning state (optimizer, scheduler, epoch) for resuming
    model.pt | backbone.pt the job's self-describing DermaNet checkpoint (its `export_fn`)
    confusion_matrix.png   the validation confusion matrix of that epoch (when there is one)
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import ray.train

from dermanet.eval.plots import confusion_matrix_figure, save_figure

LIGHTNING_CKPT = "checkpoint.ckpt"
MODEL_FILE = "model.pt"
CONFUSION_PNG = "confusion_matrix.png"


class RayTrainReporter(pl.Callback):
    """On each train-epoch end (after validation): save, then `ray.train.report`.

    Every rank writes the Lightning state (a collective); rank 0 also calls
    `export_fn(module, folder, metrics)`, the job's own artefact (a classifier's `model.pt`,
    BYOL's `backbone.pt`), and the validation confusion matrix when the module has one.
    `required_metrics` are always reported (NaN when an epoch did not measure them, e.g. no
    validation), so Ray's checkpoint ranking never looks up a missing key. `epoch_log` (rank 0,
    e.g. MLflow) gets each epoch's metrics once its checkpoint is reported.
    """

    def __init__(
        self,
        export_fn: Callable[[pl.LightningModule, Path, dict[str, float]], Any],
        metrics_csv: str | None = None,
        confusion_png_dir: str | None = None,
        required_metrics: tuple[str, ...] = (),
        epoch_log: Callable[[dict[str, float]], Any] | None = None,
    ):
        self.export_fn = export_fn
        self.metrics_csv = metrics_csv
        self.confusion_png_dir = confusion_png_dir
        self.required_metrics = required_metrics
        self.epoch_log = epoch_log

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {k: v for k, v in epoch_metrics(trainer, pl_module).items() if math.isfinite(v)}
        for key in self.required_metrics:
            metrics.setdefault(key, math.nan)
        metrics["epoch"] = trainer.current_epoch
        metrics["step"] = trainer.global_step
        rank = ray.train.get_context().get_world_rank()
        folder = Path(tempfile.mkdtemp(prefix=f"dermanet-ckpt-r{rank}-"))
        try:
            trainer.save_checkpoint(folder / LIGHTNING_CKPT)  # collective: every rank calls it
            checkpoint = None
            if rank == 0:
                self.export_fn(pl_module, folder, metrics)
                self._save_confusion(pl_module, folder, trainer.current_epoch)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)
            if rank == 0 and self.metrics_csv:
                append_metrics_row(self.metrics_csv, metrics)
            if rank == 0 and self.epoch_log is not None:
                self.epoch_log(metrics)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _save_confusion(self, pl_module: pl.LightningModule, folder: Path, epoch: int) -> None:
        matrix = getattr(pl_module, "last_confusion", None)
        if matrix is None or not getattr(pl_module, "validated_this_epoch", True):
            return
        fig = confusion_matrix_figure(matrix, title=f"Validation confusion matrix, epoch {epoch}")
        for logger in pl_module.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("val/confusion_matrix", fig, epoch, close=False)
        save_figure(fig, folder / CONFUSION_PNG)
        if self.confusion_png_dir:
            Path(self.confusion_png_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy(
                folder / CONFUSION_PNG, Path(self.confusion_png_dir) / f"epoch_{epoch:03d}.png"
            )


def epoch_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """The metrics of the epoch that just ended, without `val/` ones from an earlier epoch.

    Lightning keeps the last validation's values in `callback_metrics` on epochs that skip
    validation (`--val-every`); reported or printed as this epoch's, they would look measured.
    Non-finite values stay (the console shows a NaN loss; the report drops them).
    """
    validated = getattr(pl_module, "validated_this_epoch", True)
    return {
        k: float(v)
        for k, v in trainer.callback_metrics.items()
        if validated or not k.startswith("val/")
    }


def append_metrics_row(path: str | Path, metrics: dict[str, float]) -> None:
    """One row per epoch, appended, so a resumed run keeps the history of earlier attempts."""
    path = Path(path)
    row = pd.DataFrame([metrics])
    if path.is_file():
        row = pd.concat([pd.read_csv(path), row], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    row.drop_duplicates("epoch", keep="last").to_csv(path, index=False)
