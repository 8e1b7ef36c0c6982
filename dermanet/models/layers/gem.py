"""Generalised-mean (GeM) pooling with a learnable exponent (Radenović et al. 2018)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """GeM pooling: (mean(x^p))^(1/p) over H, W.

    p = softplus(raw_p) keeps the exponent positive whatever the optimiser does, and the
    pooling runs in float32 even under autocast: x^p overflows float16 for p around 3.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        if p <= 0:
            raise ValueError(f"GeM p must be positive, got {p}")
        # Inverse softplus so that softplus(raw_p) == p at start.
        self.raw_p = nn.Parameter(torch.tensor(math.log(math.expm1(p)), dtype=torch.float32))
        self.eps = eps

    @property
    def p(self) -> torch.Tensor:
        """The current (always positive) exponent."""
        return F.softplus(self.raw_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            p = self.p.float()
            pooled = x.float().clamp(min=self.eps).pow(p).mean(dim=(2, 3))
            return pooled.pow(1.0 / p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"
