"""ResNet basic block with Squeeze-and-Excitation before the residual add."""

from __future__ import annotations

import torch
from torch import nn

from dermanet.models.layers.activations import make_activation
from dermanet.models.layers.squeeze_excite import SqueezeExcite


class BasicBlockSE(nn.Module):
    """3x3 conv-BN-act, 3x3 conv-BN, SE, residual add, act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: str, se_ratio: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = make_activation(act)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se: nn.Module = SqueezeExcite(out_ch, se_ratio, act) if se_ratio > 0 else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.act2 = make_activation(act)
        # Zero-init the last BN so every block starts as identity (Goyal et al. 2017).
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.act2(out + self.shortcut(x))
