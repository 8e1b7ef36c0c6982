"""Squeeze-and-Excitation (Hu et al. 2018): channel re-weighting from global context."""

from __future__ import annotations

import torch
from torch import nn

from dermanet.models.layers.activations import make_activation


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 reduce -> act -> 1x1 expand -> sigmoid gate."""

    def __init__(self, channels: int, se_ratio: float, act: str = "silu", min_hidden: int = 8):
        super().__init__()
        hidden = max(min_hidden, round(channels * se_ratio))
        self.reduce = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = make_activation(act)
        self.expand = nn.Conv2d(hidden, channels, kernel_size=1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = self.gate(self.expand(self.act(self.reduce(scale))))
        return x * scale
