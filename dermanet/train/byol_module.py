"""LightningModule for BYOL pretraining (lightning.pytorch; what ray.train.lightning drives).

Batch contract (the Ray Data two-view pipeline): a dict with ``view1`` and ``view2`` float32
(N, 3, H, W) and ``index`` int64 (N,). The momentum target is updated once per optimiser step,
so gradient accumulation does not speed up the EMA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch

from dermanet.models.byol import BYOL, cosine_momentum, embedding_std
from dermanet.models.config import ModelConfig
from dermanet.models.factory import create_model
from dermanet.train.optim import ScheduledModule


class BYOLModule(ScheduledModule):
    """Trains `BYOL`: loss, logging, EMA update per optimiser step, optimiser + LR schedule.

    ``total_steps`` is the number of optimiser steps of the whole run (drives the momentum and
    LR schedules); None derives it from ``trainer.estimated_stepping_batches``, which needs a
    finite ``max_steps`` or a sized data loader (a Ray Data iterator has no length: pass it).
    """

    def __init__(
        self,
        model_config: ModelConfig | dict[str, Any] | str | Path | None = None,
        proj_hidden_dim: int = 4096,
        proj_out_dim: int = 256,
        pred_hidden_dim: int = 4096,
        optimizer: Literal["adamw", "lars"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        base_momentum: float = 0.996,
        final_momentum: float = 1.0,
        lars_momentum: float = 0.9,
        lars_trust_coefficient: float = 0.001,
        sync_batchnorm: bool = False,
    ):
        super().__init__()
        backbone = create_model(model_config)
        # save_hyperparameters reads this local: a plain dict keeps checkpoints weights_only-safe.
        model_config = backbone.config.to_dict()
        self.save_hyperparameters()
        self.byol = BYOL(
            backbone,
            proj_hidden_dim=proj_hidden_dim,
            proj_out_dim=proj_out_dim,
            pred_hidden_dim=pred_hidden_dim,
            sync_batchnorm=sync_batchnorm,
        )
        self._total_steps: int | None = total_steps
        self._last_target_step = 0

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (known once `configure_optimizers` has run)."""
        if self._total_steps is None:
            estimated = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimated) or estimated < 1:
                raise ValueError(
                    "BYOLModule cannot derive the number of optimiser steps (the data loader "
                    "has no length and max_steps is not set); pass total_steps="
                )
            self._total_steps = int(estimated)
        return self._total_steps

    def momentum_at(self, step: int) -> float:
        """Target momentum for 0-based optimiser step ``step``."""
        hp = self.hparams
        return cosine_momentum(step, self.total_steps, hp.base_momentum, hp.final_momentum)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if "view1" not in batch or "view2" not in batch:
            raise KeyError(
                f"a BYOL batch is a dict with 'view1', 'view2' (and 'index'); got {sorted(batch)}"
            )
        out = self.byol(batch["view1"], batch["view2"])
        n = batch["view1"].shape[0]
        # Step values for TensorBoard, epoch means (all ranks) for the per-epoch metrics.csv.
        per_epoch = {"on_step": True, "on_epoch": True, "sync_dist": True, "batch_size": n}
        self.log("train/loss", out.loss, prog_bar=True, **per_epoch)
        self.log("train/embedding_std", embedding_std(out.z1.detach()), **per_epoch)
        self.log("train/momentum", self.momentum_at(self.global_step), batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return out.loss

    def on_train_start(self) -> None:
        self._last_target_step = self.global_step  # resumed runs continue where they were

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimiser steps and is already advanced here; with gradient
        # accumulation it moves only on the last micro-batch, so the EMA runs once per step.
        while self._last_target_step < self.global_step:
            self.byol.update_target(self.momentum_at(self._last_target_step))
            self._last_target_step += 1

    def optimized_module(self) -> torch.nn.Module:
        return self.byol

    def save_backbone(self, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
        """Write the online backbone as ``backbone.pt`` for fine-tuning."""
        from dermanet.inference.checkpoint import save_backbone

        info = {"method": "byol", "optimizer_steps": int(self.global_step)}
        return save_backbone(
            path,
            self.byol.model_config,
            self.byol.export_backbone(),
            {**info, **(provenance or {})},
        )
