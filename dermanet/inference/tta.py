"""Test-time augmentation views of a normalised batch (N, 3, S, S), computed on the tensor.

Dermoscopy has no canonical orientation, so flips and transposes are label-preserving; crops
look closer at the lesion. The first view is always the plain image (the served path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TTA_MODES = ("none", "flips", "dihedral", "multicrop")
CROP_SCALE = 0.875  # side of the five crops, relative to the image


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of `mode`: none (1), flips (4), dihedral (8), multicrop (4 flips + 5 crops)."""
    if mode not in TTA_MODES:
        raise ValueError(f"TTA mode must be one of {TTA_MODES}, got {mode!r}")
    if mode == "none":
        return [images]
    flips = [images, images.flip(3), images.flip(2), images.flip(2, 3)]
    if mode == "flips":
        return flips
    if mode == "dihedral":
        return flips + [v.transpose(2, 3) for v in flips]
    return flips + five_crops(images, CROP_SCALE)


def five_crops(images: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """Centre and four corner crops of `scale` x the side, resized back to the input size."""
    size = images.shape[-1]
    side = max(1, round(size * scale))
    last = size - side
    corners = [(last // 2, last // 2), (0, 0), (0, last), (last, 0), (last, last)]
    return [
        F.interpolate(
            images[..., y : y + side, x : x + side], size=(size, size), mode="bilinear",
            align_corners=False,
        )
        for y, x in corners
    ]  # fmt: skip
