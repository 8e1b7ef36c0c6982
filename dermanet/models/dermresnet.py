"""DermResNetSE: a ResNet-style classifier with SE blocks and learnable GeM pooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dermanet.models.config import ModelConfig
from dermanet.models.layers import BasicBlockSE, GeM, make_activation

HEAD_PREFIXES = ("head.", "aux_head.")


@dataclass
class DermNetOutput:
    """Everything one forward pass produces, by name (never a tuple whose length varies).

    feature_map: last-stage activations (N, C, h, w), the Grad-CAM target.
    features: GeM-pooled float32 features (N, C), what BYOL learns on.
    logits: class scores (N, num_classes).
    malignancy_logit: benign-vs-malignant score (N,), only with the auxiliary head.
    """

    feature_map: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    malignancy_logit: torch.Tensor | None = None


class DermResNetSE(nn.Module):
    """Stem (7x7/2 conv + max-pool), SE basic-block stages, GeM, LayerNorm-Dropout-Linear head."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        cfg = self.config
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, cfg.stem_width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(cfg.stem_width),
            make_activation(cfg.act),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages = []
        in_ch = cfg.stem_width
        for i, (depth, width) in enumerate(zip(cfg.layers, cfg.widths, strict=True)):
            blocks = [
                BasicBlockSE(
                    in_ch if j == 0 else width,
                    width,
                    stride=2 if (i > 0 and j == 0) else 1,
                    act=cfg.act,
                    se_ratio=cfg.se_ratio,
                )
                for j in range(depth)
            ]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.pool = GeM(p=cfg.gem_p)
        self.head = nn.Sequential(
            nn.LayerNorm(cfg.feature_dim),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.feature_dim, cfg.num_classes),
        )
        self.aux_head: nn.Module | None = (
            nn.Linear(cfg.feature_dim, 1) if cfg.aux_malignancy_head else None
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage feature map, the layer Grad-CAM explains."""
        return self.stages(self.stem(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled float32 features: the backbone's output, used by BYOL."""
        return self.pool(self.forward_feature_map(x))

    def forward(self, x: torch.Tensor) -> DermNetOutput:
        feature_map = self.forward_feature_map(x)
        features = self.pool(feature_map)
        logits = self.head(features)
        aux = self.aux_head(features).squeeze(-1) if self.aux_head is not None else None
        return DermNetOutput(feature_map, features, logits, aux)

    # -- what explanations need (Grad-CAM): the layer, head gradients, geometry --------------
    @property
    def cam_layer(self) -> nn.Module:
        """The last stage: its feature map is what Grad-CAM weighs."""
        return self.stages[-1]

    def explainable_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`forward(x).logits` with the head's LayerNorm scale held constant in the backward pass.

        LayerNorm makes the logits blind to the feature vector's length, so exact gradients are
        orthogonal to the dominant (lesion) direction and Grad-CAM would stay dark exactly on
        the lesion; treating the scale as a constant (Ali et al. 2022) fixes that. Forward
        values are unchanged.
        """
        return self.explainable_head(self.forward_feature_map(x))

    def explainable_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """`explainable_logits` from the last stage's feature map: pooling and head only, so a
        CAM can take its gradient from a feature map another engine (ONNX Runtime) computed."""
        features = self.pool(feature_map)
        norm, dropout, linear = self.head
        centred = features - features.mean(dim=-1, keepdim=True)
        var = features.var(dim=-1, unbiased=False, keepdim=True).detach()
        z = centred / torch.sqrt(var + norm.eps)
        if norm.elementwise_affine:
            z = z * norm.weight + norm.bias
        return linear(dropout(z))

    def feature_grid(self) -> FeatureGrid:
        """Where feature cell j of the last stage sits in the input: `offset + stride * j`.

        Receptive-field centres from the main path's convs and pools: same-padded stride-2
        layers centre output j on input 2j, not 2j + 0.5, so a naive resize would put a
        32-stride CAM about 16 pixels down-right of the evidence.
        """
        stride, offset = 1.0, 0.0
        for name, module in [*self.stem.named_modules(), *self.stages.named_modules()]:
            if "shortcut" in name or ".se" in name or not isinstance(module, _SPATIAL):
                continue
            k, s, p = (_pair(getattr(module, a)) for a in ("kernel_size", "stride", "padding"))
            dilation = _pair(getattr(module, "dilation", 1))
            offset += ((k - 1) * dilation / 2 - p) * stride
            stride *= s
        return FeatureGrid(stride, offset)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of stem, stages and pooling, without the classifier heads (for backbone.pt)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(HEAD_PREFIXES)}

    def load_backbone(self, state: dict[str, torch.Tensor]) -> BackboneLoadReport:
        """Load backbone weights non-strictly and say what matched, so users can check."""
        own = self.backbone_state_dict()
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        mismatched = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
        self.load_state_dict(usable, strict=False)
        return BackboneLoadReport(
            matched=sorted(usable),
            missing=sorted(set(own) - set(usable)),
            unexpected=sorted(k for k in state if k not in own),
            shape_mismatch=mismatched,
        )


@dataclass(frozen=True)
class FeatureGrid:
    """Where feature cell j sits in the input: pixel index `offset + stride * j`."""

    stride: float
    offset: float


_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _pair(value: int | tuple[int, ...]) -> int:
    return int(value[0] if isinstance(value, tuple) else value)


@dataclass
class BackboneLoadReport:
    """Which backbone keys a pretrained state dict supplied."""

    matched: list[str]
    missing: list[str]
    unexpected: list[str]
    shape_mismatch: list[str]

    def summary(self) -> str:
        return (
            f"backbone keys: {len(self.matched)} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.shape_mismatch)} shape mismatches"
        )


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
