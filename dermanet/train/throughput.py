"""Training throughput per epoch, logged with the metrics so runs can be compared."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl


class EpochThroughput(pl.Callback):
    """Logs `perf/train_images_per_sec` (all workers together) and `perf/epoch_seconds`.

    Images are counted from the end of the first training batch to the end of the last, so
    pipeline start-up and the validation pass are not counted; the count is multiplied by the
    world size (DDP workers see equal shards). Put it before the reporting callback.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        self._first_end: float | None = None
        self._last_end = 0.0
        self._images = 0

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._first_end is None:
            self._first_end = now
        else:
            self._images += len(next(iter(batch.values())))
            self._last_end = now

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._first_end is None or self._images == 0:
            return
        rate = self._images * trainer.world_size / (self._last_end - self._first_end)
        pl_module.log("perf/train_images_per_sec", rate, rank_zero_only=True)
        pl_module.log("perf/epoch_seconds", time.perf_counter() - self._epoch_start,
                      rank_zero_only=True)  # fmt: skip
