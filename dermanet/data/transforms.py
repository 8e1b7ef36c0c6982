"""Albumentations pipelines: one definition of training and evaluation preprocessing.

Serving and evaluation call `eval_transform` + `to_model_input` too, so preprocessing can never
drift between training and inference.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # it otherwise calls the network

import albumentations as A
import cv2
import numpy as np
import torch

# Per-channel RGB statistics of derm-sample (3,000 random images, measured 2026-11-25).
DERM_MEAN: tuple[float, float, float] = (0.7419, 0.5606, 0.5605)
DERM_STD: tuple[float, float, float] = (0.1514, 0.1571, 0.1733)


def _compose(
    steps: list, mean: tuple[float, ...], std: tuple[float, ...], normalize: bool
) -> A.Compose:
    """Append normalisation unless the caller normalises later (on the training device)."""
    if normalize:
        steps = [*steps, A.Normalize(mean=mean, std=std, max_pixel_value=255.0)]
    return A.Compose(steps)


def train_transform(
    img_size: int,
    mean: tuple[float, ...] = DERM_MEAN,
    std: tuple[float, ...] = DERM_STD,
    normalize: bool = True,
) -> A.Compose:
    """Training augmentation. Dermoscopy has no canonical orientation, so all flips/rotations
    are label-preserving; colour changes stay mild because colour is diagnostic."""
    return _compose(
        [
            A.RandomResizedCrop(size=(img_size, img_size), scale=(0.5, 1.0), ratio=(0.8, 1.25)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(rotate=(-30, 30), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.ColorJitter(
                brightness=0, contrast=0, saturation=(0.8, 1.2), hue=(-0.03, 0.03), p=0.4
            ),
            A.GaussianBlur(blur_limit=(3, 5), p=0.15),
        ],
        mean,
        std,
        normalize,
    )


def eval_transform(
    img_size: int,
    mean: tuple[float, ...] = DERM_MEAN,
    std: tuple[float, ...] = DERM_STD,
    normalize: bool = True,
) -> A.Compose:
    """Deterministic evaluation/inference preprocessing: resize to a square, normalise."""
    return _compose(
        [
            A.Resize(height=img_size, width=img_size, interpolation=cv2.INTER_AREA),
        ],
        mean,
        std,
        normalize,
    )


def to_model_input(transform: A.Compose, image: np.ndarray) -> np.ndarray:
    """Apply a transform to an RGB uint8 (H, W, 3) image; return float32 (3, H, W)."""
    out = transform(image=image)["image"]
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)


def to_uint8_chw(transform: A.Compose, image: np.ndarray) -> np.ndarray:
    """Apply a transform built with normalize=False; return uint8 (3, H, W).

    Training pipelines ship uint8 (4x fewer bytes through Ray's object store) and normalise on
    the training device with `normalize_images`.
    """
    out = transform(image=image)["image"]
    return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.uint8)


def normalize_images(
    images: torch.Tensor,
    mean: tuple[float, ...] = DERM_MEAN,
    std: tuple[float, ...] = DERM_STD,
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised, on the tensor's own device.

    Same arithmetic as albumentations' Normalize(max_pixel_value=255) in `to_model_input`.
    """
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, device=images.device, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, device=images.device, dtype=torch.float32).view(shape)
    return (images.float() / 255.0 - mean_t) / std_t


def byol_transform(
    img_size: int,
    mean: tuple[float, ...] = DERM_MEAN,
    std: tuple[float, ...] = DERM_STD,
    normalize: bool = True,
) -> A.Compose:
    """BYOL view augmentation (Grill et al. 2020, Table 6), softened where colour is diagnostic:
    crops, flips, colour jitter, occasional grayscale, blur and solarisation."""
    return _compose(
        [
            A.RandomResizedCrop(size=(img_size, img_size), scale=(0.2, 1.0)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.05, p=0.8),
            A.ToGray(p=0.2),
            A.GaussianBlur(blur_limit=(3, 7), sigma_limit=(0.1, 2.0), p=0.5),
            A.Solarize(threshold_range=(0.5, 0.5), p=0.1),
        ],
        mean,
        std,
        normalize,
    )
