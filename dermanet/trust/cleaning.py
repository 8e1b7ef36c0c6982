"""The gate's second look: a dermoscopic image with its hair and ink marks painted out.

Hair across a lesion, a ruler's dark ticks and a surgeon's purple marker are everyday
dermoscopy, but they move the model's features away from the training images, and the OOD
score then refuses a real lesion as "unlike the training images". An image the first look
refuses gets a second one: thin dark lines (a morphological black-hat, as in DullRazor: Lee et
al. 1997) and saturated purple/blue strokes are masked and inpainted (Telea 2004), the cleaned
image is scored again, and it is accepted only if it is then as typical as most validation
images (`second_look_threshold`, stricter than the gate's own). Screenshots, documents and
ordinary photos do not become dermoscopy by losing their dark lines; docs/trust.md gives the
measurements. The probabilities answered are still the image's own.
"""

from __future__ import annotations

import cv2
import numpy as np

from dermanet.data.images import shrink_image

# black-hat depth (grey levels) that marks a pixel as part of a thin dark line
HAIR_CONTRAST = 12
# the structuring element's side as a share of the short side (odd, at least MIN_HAIR_KERNEL)
HAIR_KERNEL_FRACTION = 1 / 30
MIN_HAIR_KERNEL = 9
# marker ink: OpenCV hue (0-180) of violet to blue, with at least this saturation (0-255)
INK_HUE = (105, 165)
INK_SATURATION = 70
INPAINT_RADIUS = 5  # px
# Cleaning works on a copy at most this short side: the model reads 192 px, and inpainting's
# cost grows with the masked area (600x450: 0.36 s a picture; derm-sample's 256 px: 0.05 s).
CLEANING_SIDE = 256


def artefact_mask(image: np.ndarray) -> np.ndarray:
    """Bool (H, W): the pixels of thin dark lines (hair, ruler ticks) and of marker ink."""
    _check_rgb(image)
    kernel = max(MIN_HAIR_KERNEL, round(min(image.shape[:2]) * HAIR_KERNEL_FRACTION) | 1)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    element = cv2.getStructuringElement(cv2.MORPH_RECT, (kernel, kernel))
    lines = cv2.morphologyEx(grey, cv2.MORPH_BLACKHAT, element) > HAIR_CONTRAST
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    ink = (hsv[..., 0] >= INK_HUE[0]) & (hsv[..., 0] <= INK_HUE[1])
    ink &= hsv[..., 1] >= INK_SATURATION
    mask = (lines | ink).astype(np.uint8)
    return cv2.dilate(mask, np.ones((3, 3), np.uint8)).astype(bool)


def remove_artefacts(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) → a new array, shrunk to at most `CLEANING_SIDE` on its short
    side, with `artefact_mask`'s pixels inpainted."""
    _check_rgb(image)
    image = shrink_image(image, CLEANING_SIDE, "short")
    mask = artefact_mask(image)
    if not mask.any():
        return image.copy()
    return cv2.inpaint(image, mask.astype(np.uint8) * 255, INPAINT_RADIUS, cv2.INPAINT_TELEA)


def _check_rgb(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):  # fmt: skip
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {got}")
