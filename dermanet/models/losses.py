"""Loss functions as plain functions (solo-learn style): the methods own heads, not maths."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE, ``2 - 2·cos(p, z)``, averaged over the batch.

    0 when prediction and target point the same way, 4 when opposite. Computed in float32 so
    that the normalisation does not lose precision under autocast. The target ``z`` is used
    as given: pass it detached (BYOL's target branch runs under ``no_grad``).
    """
    if p.shape != z.shape or p.ndim != 2:
        raise ValueError(
            f"byol_loss needs two (N, D) tensors of one shape, got {p.shape} and {z.shape}"
        )
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.float(), dim=-1)
    return (2.0 - 2.0 * (p * z).sum(dim=-1)).mean()
