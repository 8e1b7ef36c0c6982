"""BYOL (Grill et al. 2020) around a DermResNetSE: online and momentum-target networks.

The method owns its momentum machinery (solo-learn style): the training loop only calls
``forward`` for the loss and ``update_target`` once per optimiser step. What fine-tuning needs
afterwards is the online backbone (`export_backbone`), which training writes as a backbone
checkpoint (``dermanet.inference.checkpoint.save_backbone``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dermanet.models.config import ModelConfig
from dermanet.models.dermresnet import DermResNetSE
from dermanet.models.losses import byol_loss


@dataclass
class BYOLOutput:
    """One BYOL forward pass, by name.

    loss: symmetric loss ``byol_loss(p1, z2') + byol_loss(p2, z1')``, each term a batch mean,
        so it lies in [0, 8] (0: predictions match the target perfectly).
    z1, z2: online projections of the two views (N, proj_out_dim), for collapse monitoring.
    features1, features2: online backbone (GeM) features of the two views (N, feature_dim).
    """

    loss: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor
    features1: torch.Tensor
    features2: torch.Tensor


def cosine_momentum(
    step: int, total_steps: int, base_momentum: float = 0.996, final: float = 1.0
) -> float:
    """Target EMA momentum for optimiser step ``step`` (0-based) of ``total_steps``.

    ``base_momentum`` at step 0, rising along a half cosine to ``final`` at the last step
    (``total_steps - 1``) and staying there after it (BYOL's schedule).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps == 1:
        return float(final)
    progress = min(step, total_steps - 1) / (total_steps - 1)
    return float(final - (final - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0)


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse indicator: per-dimension std of L2-normalised embeddings, averaged.

    About ``1/sqrt(D)`` for embeddings spread over the sphere; tends to 0 when every input maps
    to the same point (the failure BYOL's predictor and momentum target exist to prevent).
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"embedding_std needs (N >= 2, D) embeddings, got shape {tuple(z.shape)}")
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


class BYOL(nn.Module):
    """Online (backbone → projector → predictor) and EMA target (backbone → projector).

    The backbone's classifier heads are frozen: BYOL never uses them, and DDP rejects trainable
    parameters that receive no gradient. The target copies never require gradients.
    """

    def __init__(
        self,
        backbone: DermResNetSE,
        proj_hidden_dim: int = 4096,
        proj_out_dim: int = 256,
        pred_hidden_dim: int = 4096,
        sync_batchnorm: bool = False,
    ):
        super().__init__()
        # lightly pulls in torchvision (~1 s): import it when a BYOL is built, so that
        # `import dermanet.models` stays light for serving.
        from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead

        self.backbone = backbone
        for head in (backbone.head, backbone.aux_head):
            if head is not None:
                head.requires_grad_(False)
        self.projector = BYOLProjectionHead(backbone.feature_dim, proj_hidden_dim, proj_out_dim)
        self.predictor = BYOLPredictionHead(proj_out_dim, pred_hidden_dim, proj_out_dim)
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        if sync_batchnorm:
            convert_sync_batchnorm(self)

    @property
    def model_config(self) -> ModelConfig:
        return self.backbone.config

    def _online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(x)
        z = self.projector(features)
        return features, z, self.predictor(z)

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone.forward_features(x))

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> BYOLOutput:
        """Symmetric BYOL loss of two augmented views of the same images.

        Each view goes through the networks on its own, so BatchNorm statistics are per view
        as in the paper.
        """
        if view1.shape != view2.shape:
            raise ValueError(f"the two views differ in shape: {view1.shape} vs {view2.shape}")
        f1, z1, p1 = self._online(view1)
        f2, z2, p2 = self._online(view2)
        t1, t2 = self._target(view1), self._target(view2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return BYOLOutput(loss=loss, z1=z1, z2=z2, features1=f1, features2=f2)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target ← m·target + (1−m)·online for backbone and projector; buffers copied."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        pairs = ((self.backbone, self.target_backbone), (self.projector, self.target_projector))
        for online, target in pairs:
            for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
                p_target.mul_(momentum).add_(p_online.detach(), alpha=1.0 - momentum)
            for b_online, b_target in zip(online.buffers(), target.buffers(), strict=True):
                b_target.copy_(b_online)

    def export_backbone(self) -> dict[str, torch.Tensor]:
        """The online backbone's weights (no classifier-head keys), detached CPU copies.

        This is what ``DermResNetSE.load_backbone`` takes (``jobs/train.py --pretrain-ckpt``).
        """
        return {k: v.detach().cpu().clone() for k, v in self.backbone.backbone_state_dict().items()}


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every BatchNorm for SyncBatchNorm (in place for containers), for multi-GPU BYOL.

    BYOL's BatchNorm statistics matter (they are part of what stops collapse), so small
    per-GPU batches benefit from statistics over the global batch. Without an initialised
    process group SyncBatchNorm behaves as plain BatchNorm, so this is safe on one device.
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
