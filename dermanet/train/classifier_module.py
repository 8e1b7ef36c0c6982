"""Supervised fine-tuning of DermResNetSE as a LightningModule (run by Ray Train workers)."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dermanet.classes import CLASS_NAMES, malignant_mask
from dermanet.eval.metrics import classification_metrics, confusion_matrix
from dermanet.models import DermResNetSE, ModelConfig, create_model
from dermanet.train.optim import ScheduledModule


def weighted_smoothed_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """Class-weighted cross-entropy with label smoothing, each sample weighted by its TRUE class.

    `F.cross_entropy(weight=..., label_smoothing=...)` also weights the smoothing term of every
    sample by all classes' weights; with ISIC's imbalance (weights 0.2..13) that pushes every
    prediction towards the rare classes. Here sample i contributes
    w[y_i] * ((1 - eps) * -log p_i[y_i] + eps * mean_k -log p_i[k]) / sum_i w[y_i].
    """
    log_probs = F.log_softmax(logits.float(), dim=1)
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    per_sample = (1.0 - smoothing) * nll + smoothing * -log_probs.mean(dim=1)
    weights = class_weights[labels]
    return (weights * per_sample).sum() / weights.sum()


def mix_batch(
    images: torch.Tensor, mixup_alpha: float, cutmix_alpha: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup or CutMix of a batch with a shuffled copy of itself (Zhang 2018, Yun 2019).

    Returns (mixed images, permutation, lambda): the loss is
    lambda * L(labels) + (1 - lambda) * L(labels[permutation]). With both alphas set, each batch
    draws one of the two (timm's switch). Uses torch's RNG, so seeded runs repeat.
    """
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(images.shape[0], device=images.device)
    if not use_cutmix:
        return lam * images + (1.0 - lam) * images[perm], perm, lam
    h, w = images.shape[-2:]
    cut_h, cut_w = int(h * math.sqrt(1.0 - lam)), int(w * math.sqrt(1.0 - lam))
    cy, cx = int(torch.randint(h, ()).item()), int(torch.randint(w, ()).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = images.clone()
    mixed[..., y0:y1, x0:x1] = images[perm][..., y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area really pasted
    return mixed, perm, lam


class ClassifierModule(ScheduledModule):
    """Weighted cross-entropy (+ optional label smoothing and benign-vs-malignant auxiliary
    loss), AdamW/LARS with per-step warm-up + cosine, metrics over the whole validation set.

    Recipe options: Mixup/CutMix on the training batch, and an exponential moving average of
    the weights (`ema_decay` > 0), which then is what validation scores and exports ship.

    Batches follow the pipeline contract: {"image": float32 (N,3,S,S), "label": int64, ...}.
    """

    def __init__(
        self,
        model_config: dict[str, Any],
        class_weights: list[float],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        optimizer: str = "adamw",
        label_smoothing: float = 0.0,
        aux_loss_weight: float = 0.0,
        warmup_steps: int = 0,
        total_steps: int = 1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        ema_decay: float = 0.0,
        channels_last: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        config = dict(model_config)
        config["aux_malignancy_head"] = bool(config.get("aux_malignancy_head")) or (
            aux_loss_weight > 0
        )
        self.model = create_model(ModelConfig.from_dict(config))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema_model: DermResNetSE | None = None
        if ema_decay > 0:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
            self._ema_step = 0
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32))
        self.register_buffer("malignant", torch.tensor(malignant_mask(), dtype=torch.float32))
        self._val_logits: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []
        self.last_confusion: np.ndarray | None = None
        self.validated_this_epoch = False
        self.last_val_probs: np.ndarray | None = None
        self.last_val_labels: np.ndarray | None = None

    def optimized_module(self) -> torch.nn.Module:
        return self.model

    def inference_model(self) -> DermResNetSE:
        """What validation scores and checkpoints ship: the weight average when there is one."""
        return self.ema_model if self.ema_model is not None else self.model

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        if self.hparams.get("channels_last"):
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def _loss(
        self,
        batch: dict[str, torch.Tensor],
        model: torch.nn.Module | None = None,
        mix: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._input(batch["image"]), batch["label"]
        hp = self.hparams
        mixing = mix and (hp.get("mixup_alpha", 0) > 0 or hp.get("cutmix_alpha", 0) > 0)
        if mixing and torch.rand(()).item() < hp.get("mix_prob", 1.0):
            images, perm, lam = mix_batch(images, hp.mixup_alpha, hp.cutmix_alpha)
        else:
            perm, lam = None, 1.0
        out = (model or self.model)(images)
        loss = self._criterion(out, labels)
        if perm is not None:
            loss = lam * loss + (1.0 - lam) * self._criterion(out, labels[perm])
        return loss, out.logits

    def _criterion(self, out: Any, labels: torch.Tensor) -> torch.Tensor:
        loss = weighted_smoothed_cross_entropy(
            out.logits, labels, self.class_weights, self.hparams.label_smoothing
        )
        if self.hparams.aux_loss_weight > 0 and out.malignancy_logit is not None:
            target = self.malignant[labels]
            aux = F.binary_cross_entropy_with_logits(out.malignancy_logit.float(), target)
            loss = loss + self.hparams.aux_loss_weight * aux
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self._loss(batch, mix=True)
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        size = len(batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("train/top1", accuracy, on_epoch=True, batch_size=size, sync_dist=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Weight EMA once per optimiser step, with timm's warm-up of the decay."""
        if self.ema_model is None:
            return
        while self._ema_step < self.global_step:
            self._ema_step += 1
            decay = min(self.hparams.ema_decay, (1 + self._ema_step) / (10 + self._ema_step))
            update_ema(self.ema_model, self.model, decay)

    def on_train_epoch_start(self) -> None:
        self.validated_this_epoch = False

    def on_train_start(self) -> None:
        if self.ema_model is not None:
            self._ema_step = self.global_step  # a resumed run continues where it was

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch, model=self.inference_model())
        self.log("val/loss", loss, on_epoch=True, batch_size=len(batch["label"]), sync_dist=True)
        self._val_logits.append(logits.detach().float())
        self._val_labels.append(batch["label"].detach())

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = self._gather(torch.cat(self._val_logits))
        labels = self._gather(torch.cat(self._val_labels))
        self._val_logits.clear()
        self._val_labels.clear()
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        labels_np = labels.cpu().numpy()
        metrics = classification_metrics(probs, labels_np)
        for name, value in metrics.items():
            if np.isfinite(value):
                self.log(f"val/{name}", value)  # identical on every rank (gathered)
        self.last_confusion = confusion_matrix(labels_np, probs.argmax(axis=1), len(CLASS_NAMES))
        self.validated_this_epoch = True
        self.last_val_probs, self.last_val_labels = probs, labels_np

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-rank tensor from every DDP rank (ranks may hold different counts)."""
        if self.trainer.world_size == 1:
            return tensor
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = self.all_gather(size).flatten().tolist()
        padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, max(sizes) - tensor.shape[0]))
        gathered = self.all_gather(padded)
        return torch.cat([gathered[i, :n] for i, n in enumerate(sizes)])


@torch.no_grad()
def update_ema(average: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * model for parameters; buffers copied."""
    for p_avg, p in zip(average.parameters(), model.parameters(), strict=True):
        p_avg.lerp_(p.detach(), 1.0 - decay)
    for b_avg, b in zip(average.buffers(), model.buffers(), strict=True):
        b_avg.copy_(b)
