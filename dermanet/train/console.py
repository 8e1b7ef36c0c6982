"""Console output a person can read: one progress bar and one summary line per epoch.

Everything else a training worker says (Lightning's notices, warnings, Ray's chatter) goes to
the run's logs folder (`logs/worker_<rank>.log`), not to the terminal or `ray job logs`.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from dermanet.train.reporting import epoch_metrics

NOISY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "py.warnings")
SUMMARY = (
    ("train/loss_epoch", "loss {:.4f}"),
    ("val/loss", "val loss {:.4f}"),
    ("val/balanced_accuracy", "val bal-acc {:.4f}"),
    ("val/macro_auroc", "AUROC {:.4f}"),
    ("train/embedding_std_epoch", "emb-std {:.4f}"),
    ("perf/train_images_per_sec", "{:.0f} img/s"),
)


def quiet_worker_logs(path: Path) -> None:
    """Send Lightning's and Python's warnings and notices to `path` instead of the console."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.captureWarnings(True)
    warnings.simplefilter("default")  # each distinct warning once, into the file
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
    # Ray Train's per-report INFO line ("Reporting training result ...") on every rank: its
    # logger is named after the module's file path, not "ray.train".
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: the line stays, nothing breaks
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def epoch_summary(epoch: int, epochs: int, metrics: dict[str, Any], seconds: float) -> str:
    """'epoch 3/18 · loss 1.2345 · val bal-acc 0.5120 · AUROC 0.8610 · 412 img/s · 62 s'."""
    parts = [f"epoch {epoch + 1}/{epochs}"]
    for key, template in SUMMARY:
        if key in metrics:
            parts.append(template.format(float(metrics[key])))
    parts.append(f"{seconds:.0f} s")
    return " · ".join(parts)


class ConsoleProgress(pl.Callback):
    """Rank 0 draws one bar per epoch (on a terminal) and prints one summary line per epoch.

    The bar is Ray's tqdm, which the driver renders (a worker's own tqdm would be streamed as
    hundreds of redrawn lines); without a terminal only the summary lines are printed.
    """

    def __init__(self, batches_per_epoch: int, epochs: int, bar: bool):
        self.batches_per_epoch = batches_per_epoch
        self.epochs = epochs
        self.bar_enabled = bar
        self._bar: Any = None
        self._started = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()
        if trainer.global_rank != 0 or not self.bar_enabled:
            return
        from ray.experimental.tqdm_ray import tqdm

        self._bar = tqdm(
            total=self.batches_per_epoch,
            desc=f"epoch {trainer.current_epoch + 1}/{self.epochs}",
            unit="batch",
        )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if self._bar is None:
            return
        self._bar.update(1)
        loss = trainer.callback_metrics.get("train/loss_step", trainer.callback_metrics.get(
            "train/loss"))  # fmt: skip
        if loss is not None and batch_idx % 10 == 0:
            size = len(next(iter(batch.values()))) * trainer.world_size
            rate = size * (batch_idx + 1) / max(time.perf_counter() - self._started, 1e-9)
            self._bar.set_postfix({"loss": f"{float(loss):.3f}", "img/s": f"{rate:.0f}"})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if trainer.global_rank == 0:
            seconds = time.perf_counter() - self._started
            line = epoch_summary(trainer.current_epoch, self.epochs,
                                 epoch_metrics(trainer, pl_module), seconds)  # fmt: skip
            # Ray Train turns print() into a log record *and* a print; write the line once.
            print(line, file=sys.__stdout__, flush=True)
