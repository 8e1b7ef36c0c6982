"""GradientMonitor: global norms every step, and a forensic dump when a step goes non-finite.

BYOL pretraining occasionally produced NaNs in the original project. This callback checks
each optimiser step *before* it is applied (after backward, after AMP unscaling), so a bad
step never reaches the weights, and writes what a person needs to find the cause: the
sample indices of the batch, the loss, the global norms and which parameters went bad.

It assumes nothing about the model: any LightningModule whose batches are (optionally) dicts
with an ``index`` key works, BYOL and the classifier alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger


class NonFiniteTrainingError(RuntimeError):
    """Raised by GradientMonitor(on_nan="stop"); ``dump_path`` names the JSON report."""

    def __init__(self, message: str, dump_path: Path):
        super().__init__(message)
        self.dump_path = dump_path


def _num(value: float) -> float | str:
    """JSON has no NaN/inf: write them as strings."""
    return value if math.isfinite(value) else str(value)


class GradientMonitor(pl.Callback):
    """Log global gradient/weight norms; on a non-finite loss, gradient or weight, dump a JSON
    report into ``dump_dir`` and then stop or skip.

    on_nan="stop" (default): the step is not applied (gradients set to None), then
    ``trainer.should_stop`` is set and `NonFiniteTrainingError` is raised, so ``fit`` fails
    and a Ray Train run is marked failed rather than ending "successfully" on broken weights.
    on_nan="skip": the step is dropped (gradients set to None, so the optimiser leaves every
    parameter and its state alone) and BatchNorm buffers are restored to their values before
    the bad batch; training continues. Non-finite *weights* always stop: skipping cannot help.

    Under float16 AMP a finite loss with non-finite gradients is the GradScaler's normal
    overflow signal; the scaler skips that step itself, so it is not treated as an event.
    The decision is all-reduced across ranks so every DDP rank skips or stops together.
    Cost: one device sync per optimiser step (the finiteness check).
    """

    def __init__(
        self,
        dump_dir: str | Path,
        on_nan: Literal["stop", "skip"] = "stop",
        log_every_n_steps: int = 1,
        histogram_every_n_steps: int = 0,
        top_k: int = 10,
    ):
        if on_nan not in ("stop", "skip"):
            raise ValueError(f"on_nan must be 'stop' or 'skip', got {on_nan!r}")
        if log_every_n_steps < 1 or histogram_every_n_steps < 0:
            raise ValueError("log_every_n_steps must be >= 1 and histogram_every_n_steps >= 0")
        self.dump_dir = Path(dump_dir)
        self.on_nan = on_nan
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.top_k = top_k
        self.skipped_steps = 0
        self.dumps: list[Path] = []
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_open = False
        self._losses: list[torch.Tensor] = []
        self._indices: list[Any] = []
        self._buffers: dict[str, torch.Tensor] = {}
        self._batch_idx = -1

    # -- collecting what one optimiser step (all its accumulated micro-batches) saw ----------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._window_open:
            self._reset_window()
            self._window_open = True
            # Snapshot BN running stats: a NaN batch poisons them in the forward pass already.
            self._buffers = {n: b.detach().clone() for n, b in pl_module.named_buffers()}
        self._batch_idx = batch_idx
        if isinstance(batch, Mapping) and batch.get("index") is not None:
            index = batch["index"]
            self._indices.append(index.detach() if isinstance(index, torch.Tensor) else index)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._losses.append(loss.detach())

    # -- the check, before the optimiser applies the step -----------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._window_open = False
        stats = _StepStats.measure(pl_module, self._losses)
        loss_bad, grad_bad, weight_bad = stats.flags()  # the one device sync per step
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and grad_bad and not (loss_bad or weight_bad):
            grad_bad = False  # float16 overflow: GradScaler skips this step and lowers its scale
        local_bad = loss_bad or grad_bad or weight_bad
        if not trainer.strategy.reduce_boolean_decision(local_bad, all=False):
            self._log_norms(trainer, pl_module, stats)
            self._log_histograms(trainer, pl_module)
            return

        flagged = (("loss", loss_bad), ("grad", grad_bad), ("weight", weight_bad))
        reasons = [name for name, bad in flagged if bad] or ["another rank"]
        stop = self.on_nan == "stop" or weight_bad
        path = self._dump(trainer, pl_module, optimizer, stats, reasons, stop, scaler)
        # Never apply the bad step; undo what the bad batch did to BatchNorm running stats.
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, buf in pl_module.named_buffers():
                if name in self._buffers:
                    buf.copy_(self._buffers[name])
        if stop:
            trainer.should_stop = True
            raise NonFiniteTrainingError(
                f"non-finite {', '.join(reasons)} at optimizer step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); the step was not applied and training "
                f"stopped. Report: {path}",
                path,
            )
        self.skipped_steps += 1
        pl_module.log("monitor/skipped_steps", float(self.skipped_steps), on_step=True)

    def _log_norms(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stats: _StepStats,
    ) -> None:
        if trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log("monitor/grad_norm", stats.grad_norm, on_step=True, on_epoch=False)
            pl_module.log("monitor/weight_norm", stats.weight_norm, on_step=True, on_epoch=False)

    def _log_histograms(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.histogram_every_n_steps
        if n == 0 or trainer.global_step % n != 0 or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            writer = logger.experiment
            for name, p in pl_module.named_parameters():
                if not p.requires_grad:
                    continue
                writer.add_histogram(
                    f"weights/{name}", p.detach().float().cpu(), trainer.global_step
                )
                if p.grad is not None:
                    writer.add_histogram(
                        f"grads/{name}", p.grad.detach().float().cpu(), trainer.global_step
                    )

    def _dump(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        stats: _StepStats,
        reasons: list[str],
        stop: bool,
        scaler: Any,
    ) -> Path:
        """Write the JSON report; returns its path."""
        # on_before_backward sees loss / accumulate_grad_batches (× AMP scale): undo both.
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        losses = stats.losses.tolist() if stats.losses is not None else []
        losses = [v * trainer.accumulate_grad_batches / scale for v in losses]
        index: list[Any] | None = None
        if self._indices:
            index = []
            for item in self._indices:
                index.extend(item.flatten().tolist() if isinstance(item, torch.Tensor) else item)
        grads = list(zip(stats.grad_names, stats.grad_norms.tolist(), strict=True))
        weights = list(zip(stats.param_names, stats.weight_norms.tolist(), strict=True))
        largest = sorted((g for g in grads if math.isfinite(g[1])), key=lambda g: -g[1])
        record = {
            "event": "non_finite_training_step",
            "action": "stop" if stop else "skip",
            "reasons": reasons,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": self._batch_idx,
            "rank": trainer.global_rank,
            "batch_index": index,
            "loss": _num(losses[-1]) if losses else None,
            "losses": [_num(v) for v in losses],
            "grad_norm": _num(float(stats.grad_norm)),
            "weight_norm": _num(float(stats.weight_norm)),
            "lr": [group["lr"] for group in optimizer.param_groups],
            "nonfinite_grads": [
                {"name": n, "norm": _num(v)} for n, v in grads if not math.isfinite(v)
            ],
            "nonfinite_weights": [
                {"name": n, "norm": _num(v)} for n, v in weights if not math.isfinite(v)
            ],
            "nonfinite_buffers": [
                n
                for n, b in pl_module.named_buffers()
                if b.is_floating_point() and not bool(torch.isfinite(b).all())
            ],
            "largest_grad_norms": [{"name": n, "norm": v} for n, v in largest[: self.top_k]],
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        name = f"nonfinite-step{trainer.global_step:07d}-rank{trainer.global_rank}.json"
        path = self.dump_dir / name
        path.write_text(json.dumps(record, indent=2, allow_nan=False))
        self.dumps.append(path)
        return path


@dataclass
class _StepStats:
    """Per-parameter norms of one optimiser step, kept on the device until needed."""

    param_names: list[str]
    weight_norms: torch.Tensor  # every parameter, frozen ones included (they can go NaN too)
    weight_norm: torch.Tensor  # global norm of the trainable parameters
    grad_names: list[str]
    grad_norms: torch.Tensor
    grad_norm: torch.Tensor
    losses: torch.Tensor | None  # as seen by backward, one per accumulated micro-batch

    @classmethod
    def measure(cls, module: torch.nn.Module, losses: list[torch.Tensor]) -> _StepStats:
        named = list(module.named_parameters())
        weight_norms = torch.stack([p.detach().float().norm() for _, p in named])
        trainable = torch.tensor([p.requires_grad for _, p in named], device=weight_norms.device)
        with_grad = [(n, p.grad) for n, p in named if p.grad is not None]
        grad_norms = (
            torch.stack([g.detach().float().norm() for _, g in with_grad])
            if with_grad
            else weight_norms.new_zeros(0)  # no gradients at all: the global norm is 0
        )
        return cls(
            param_names=[n for n, _ in named],
            weight_norms=weight_norms,
            weight_norm=weight_norms[trainable].norm(),
            grad_names=[n for n, _ in with_grad],
            grad_norms=grad_norms,
            grad_norm=grad_norms.norm(),
            losses=torch.stack([loss.float() for loss in losses]) if losses else None,
        )

    def flags(self) -> tuple[bool, bool, bool]:
        """(loss, grad, weight) non-finite, fetched with one device sync."""
        no = self.grad_norm.new_zeros((), dtype=torch.bool)
        loss_bad = ~torch.isfinite(self.losses).all() if self.losses is not None else no
        grad_bad = ~torch.isfinite(self.grad_norm)
        weight_bad = ~torch.isfinite(self.weight_norms).all()
        loss, grad, weight = torch.stack([loss_bad, grad_bad, weight_bad]).tolist()
        return bool(loss), bool(grad), bool(weight)
