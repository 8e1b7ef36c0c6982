"""Albumentations pipelines: one definition of training and evaluation preprocessing.

Serving, batch inference and evaluation (validation during training, jobs/evaluate.py) all
run `eval_pixels` (the steps of `eval_transform` without albumentations' per-call overhead) on
images decoded towards `decode_side`, so preprocessing cannot drift between what is scored and
what is served; `eval_transform` stays as its reference definition.
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


COLOR_CONSTANCY = ("none", "shades_of_gray")


def shades_of_gray(image: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Shades-of-Gray colour constancy (Finlayson & Trezzi 2004), as the ISIC 2019 winner used.

    The illuminant per channel is the Minkowski p-norm mean of that channel; channels are
    rescaled so the illuminant becomes grey, which removes much of the colour cast that differs
    between dermatoscopes and cameras. RGB uint8 in, RGB uint8 out.
    """
    illuminant = shades_of_gray_illuminant(image, power).astype(np.float32)
    gain = 1.0 / (illuminant * np.float32(np.sqrt(3.0)) + np.float32(1e-6))
    # the same float32 products as scaling every pixel, but once per value: a lookup table
    table = np.clip(np.arange(256, dtype=np.float32)[:, None] * gain, 0, 255).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(image), table.reshape(256, 1, 3))


def shades_of_gray_illuminant(image: np.ndarray, power: float = 6.0) -> np.ndarray:
    """The unit-length illuminant colour (3,) of an RGB uint8 image: each channel's Minkowski
    p-norm mean over every other pixel (the estimate needs no full size), in OpenCV's
    double-precision sums (5x faster than numpy's float32 mean over two axes)."""
    sample = np.ascontiguousarray(image[::2, ::2]).astype(np.float32)
    moments = np.array(cv2.mean(cv2.pow(sample, power))[:3])
    illuminant = np.power(moments, 1.0 / power) / 255.0
    return illuminant / max(float(np.linalg.norm(illuminant)), 1e-6)


class ShadesOfGray(A.ImageOnlyTransform):
    """`shades_of_gray` as an albumentations step (always applied: it is preprocessing)."""

    def __init__(self, power: float = 6.0, p: float = 1.0):
        super().__init__(p=p)
        self.power = power

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return shades_of_gray(img, self.power)


def _colour_steps(color_constancy: str) -> list:
    if color_constancy not in COLOR_CONSTANCY:
        raise ValueError(
            f"color_constancy must be one of {COLOR_CONSTANCY}, got {color_constancy!r}"
        )
    return [ShadesOfGray()] if color_constancy == "shades_of_gray" else []


def camera_steps(p: float) -> list:
    """Augmentations that mimic other cameras and pipelines, each group with probability `p`.

    derm-sample's HAM10000 images are 200x150 re-encoded copies, other sources are larger and
    differently processed: resolution loss, JPEG re-compression, colour casts and gamma, blur
    and sensor noise are what changes between them, not the lesion.
    """
    if p <= 0:
        return []
    return [
        A.OneOf(
            [
                A.Downscale(scale_range=(0.35, 0.8), p=1.0),
                A.ImageCompression(quality_range=(30, 85), p=1.0),
            ],
            p=p,
        ),
        A.OneOf(
            [
                A.RGBShift(r_shift_limit=15, g_shift_limit=10, b_shift_limit=15, p=1.0),
                A.RandomGamma(gamma_limit=(75, 135), p=1.0),
                A.HueSaturationValue(
                    hue_shift_limit=5, sat_shift_limit=20, val_shift_limit=10, p=1.0
                ),
            ],
            p=p,
        ),
        A.OneOf(
            [
                A.GaussianBlur(blur_limit=(3, 5), p=1.0),
                A.MotionBlur(blur_limit=(3, 5), p=1.0),
                A.GaussNoise(std_range=(0.01, 0.04), p=1.0),
            ],
            p=p / 2,
        ),
    ]


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
    color_constancy: str = "none",
    camera_p: float = 0.0,
) -> A.Compose:
    """Training augmentation. Dermoscopy has no canonical orientation, so all flips/rotations
    are label-preserving; colour changes stay mild because colour is diagnostic.

    Crops span aspect ratios 3:4 to 4:3, so evaluation's whole-image squash of a 4:3 photo
    (HAM10000's 600x450, most dermatoscopes) is a view training has seen."""
    return _compose(
        [
            *_colour_steps(color_constancy),
            A.RandomResizedCrop(size=(img_size, img_size), scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(rotate=(-30, 30), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
            A.ColorJitter(
                brightness=0, contrast=0, saturation=(0.8, 1.2), hue=(-0.03, 0.03), p=0.4
            ),
            A.GaussianBlur(blur_limit=(3, 5), p=0.15),
            *camera_steps(camera_p),
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
    color_constancy: str = "none",
) -> A.Compose:
    """Deterministic evaluation/inference preprocessing: colour constancy (if the model was
    trained with it), resize to a square, normalise."""
    return _compose(
        [
            *_colour_steps(color_constancy),
            A.Resize(height=img_size, width=img_size, interpolation=cv2.INTER_AREA),
        ],
        mean,
        std,
        normalize,
    )


# The short side images keep when decoded for a model (`decode_side`): the served quality
# checks measure content on a 128 px copy (dermanet.trust.quality), so never below that.
MIN_DECODE_SIDE = 128


def decode_side(img_size: int, at_least: int = MIN_DECODE_SIDE) -> int:
    """How small a JPEG may be decoded (`decode_image(min_short_side=...)`) for a model of
    input `img_size`: twice the input side, so the one resize after it still averages at
    least 2x2 pixels and hides the DCT scaling (at 1x the shipped model's probabilities moved
    by up to 0.02 on derm-sample; at 2x by < 1e-6 at those sizes), and never below what the
    quality checks measure on. Evaluation, batch inference and serving all use it, so an
    image gets one set of probabilities wherever it is scored."""
    return max(2 * int(img_size), int(at_least))


def eval_pixels(image: np.ndarray, img_size: int, color_constancy: str = "none") -> np.ndarray:
    """Evaluation preprocessing up to normalisation: RGB uint8 (H, W, 3) → (S, S, 3).

    The steps of `eval_transform` (colour constancy if the model was trained with it, one
    INTER_AREA resize to a square) without albumentations' per-call overhead; normalisation
    runs once on the whole batch tensor (`pixels_to_tensor`, `normalize_images`).
    """
    _colour_steps(color_constancy)  # validates the name
    if color_constancy == "shades_of_gray":
        image = shades_of_gray(image)
    if image.shape[:2] != (img_size, img_size):
        image = cv2.resize(image, (img_size, img_size), interpolation=cv2.INTER_AREA)
    return image


def pixels_to_tensor(
    pixels: list[np.ndarray], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """`eval_pixels` outputs → normalised float32 (N, 3, S, S), in one step for the batch."""
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    return normalize_images(batch, mean, std).contiguous()


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
