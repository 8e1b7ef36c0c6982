"""Optimisation utilities shared by BYOL pretraining and supervised fine-tuning.

One rule for weight decay (none on norms, biases and GeM's exponent), one optimiser factory
(AdamW or LARS) and one per-step warm-up + cosine learning-rate schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm
    nn.LayerNorm,
    nn.GroupNorm,
)
NO_DECAY_NAMES = ("raw_p",)  # GeM's exponent: decaying it would pull p towards softplus(0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a not-decayed group.

    Not decayed: parameters of norm layers (BatchNorm, LayerNorm, GroupNorm), every bias and
    GeM's ``raw_p``; decaying these only shrinks scales and offsets the next layer undoes, and
    LARS must not rescale them either. Every trainable parameter lands in exactly one group
    (shared parameters once); frozen ones (e.g. BYOL's target network) in none. Empty groups
    are left out. Each group carries a ``name`` ("decay" / "no_decay") for logging.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    seen: set[int] = set()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if is_norm or name == "bias" or name in NO_DECAY_NAMES:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay", "lars_adapt": False},
    ]
    return [g for g in groups if g["params"]]


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as in BYOL.

    Per parameter: ``d = g + wd·w``, scaled by ``trust · ‖w‖ / (‖g‖ + wd·‖w‖ + eps)`` when the
    group has ``lars_adapt=True`` (default) and both norms are non-zero, then SGD momentum.
    Why not ``lightly.utils.lars.LARS``: it ties adaptation to ``weight_decay != 0``, so a run
    with weight decay 0 silently becomes plain SGD; here the exclusion is an explicit group flag
    (`param_groups` sets it off for norms, biases and GeM p).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr, momentum, weight_decay >= 0 and trust_coefficient > 0; got "
                f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                f"trust_coefficient={trust_coefficient}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "eps": eps,
            "lars_adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, momentum = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad.add(p, alpha=wd) if wd != 0 else p.grad.clone()
                if group["lars_adapt"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    trust = (
                        group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    )
                    ok = (w_norm > 0) & (g_norm > 0)
                    d_p.mul_(torch.where(ok, trust, torch.ones_like(trust)))
                if momentum != 0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d_p.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(d_p)
                    d_p = state["momentum_buffer"]
                p.add_(d_p, alpha=-group["lr"])
        return loss


def build_optimizer(
    model_or_params: nn.Module | Iterable[Any],
    name: Literal["adamw", "lars"] = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
) -> Optimizer:
    """AdamW (default) or LARS over `param_groups(model)`, or over groups/params given directly.

    ``betas`` apply to AdamW, ``momentum`` and ``trust_coefficient`` to LARS. Given explicit
    groups, a group without ``weight_decay`` gets ``weight_decay``.
    """
    if isinstance(model_or_params, nn.Module):
        params: Any = param_groups(model_or_params, weight_decay)
    else:
        params = list(model_or_params)
    if not params:
        raise ValueError("build_optimizer got no trainable parameters")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "lars":
        return LARS(
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
        )
    raise ValueError(f"unknown optimizer {name!r}; choose 'adamw' or 'lars'")


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """LR multiplier for optimiser step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` (the first step already learns, the last warm-up step
    reaches 1). Then a half cosine from 1 at ``warmup_steps`` to ``min_lr_ratio`` at
    ``total_steps``, flat after.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_schedule(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Per-step scheduler: linear warm-up, then cosine to ``min_lr_ratio`` × base LR.

    Step it once per optimiser step (Lightning: ``"interval": "step"``).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return LambdaLR(
        optimizer,
        lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, min_lr_ratio),
    )


class ScheduledModule(pl.LightningModule):
    """A LightningModule whose optimiser and per-step LR schedule come from its hparams.

    Every training method here (supervised, BYOL) inherits this one `configure_optimizers`
    and only says which module is optimised (`optimized_module`). Expected hparams: optimizer,
    lr, weight_decay, warmup_steps; optional lars_momentum, lars_trust_coefficient,
    min_lr_ratio. `total_steps` is the number of optimiser steps of the whole run.
    """

    def optimized_module(self) -> nn.Module:
        return self

    @property
    def total_steps(self) -> int:
        return max(1, int(self.hparams.total_steps))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = build_optimizer(
            self.optimized_module(),
            name=hp.optimizer,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            momentum=hp.get("lars_momentum", 0.9),
            trust_coefficient=hp.get("lars_trust_coefficient", 0.001),
        )
        total = self.total_steps
        scheduler = warmup_cosine_schedule(
            optimizer, min(hp.warmup_steps, total), total, hp.get("min_lr_ratio", 0.0)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
