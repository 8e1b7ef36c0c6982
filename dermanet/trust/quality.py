"""Cheap, explainable image-quality checks, run on the decoded image BEFORE the model.

A classifier answers whatever it is shown; these checks refuse the pictures that cannot be a
usable dermoscopy photo (icons, blank or black frames, blurred shots, screenshots and documents)
and say why in words a person can act on. Content measures are taken on a fixed-size copy
(`analysis_size` square), so every threshold means the same at 150 px and at 6000 px.
Defaults and the measurements behind them: docs/trust.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class QualityThresholds:
    """Limits of the quality checks (docs/trust.md gives each one's reason and val trip rate)."""

    min_short_side: int = 96  # px; derm-sample's smallest is 150, the default model reads 80
    max_aspect_ratio: float = 2.5  # long/short side; cameras give 1-1.8, derm-sample <= 1.55
    analysis_size: int = 128  # px square copy on which content is measured
    min_grey_std: float = 4.0  # grey-level standard deviation: below = blank
    max_flat_share: float = 0.45  # share of the centre in ONE colour: screens, documents, plots
    flat_levels: int = 64  # colour levels per channel when counting "one colour" (JPEG-proof)
    flat_centre: float = 0.7  # side of the central box the flat share is counted in (fraction)
    min_brightness: float = 40.0  # 90th percentile of grey 0-255: below = too dark
    max_clipped_share: float = 0.5  # share of pixels at >= 250 grey: over-exposed
    min_sharpness: float = 8.0  # variance of the Laplacian of the grey copy: below = blurred
    max_sharpness: float = 5000.0  # above = grainy noise (derm-sample val: at most ~2,900)
    # Laplacian variance / grey variance: pixel noise has as much energy in its finest detail as
    # overall (white noise ~18 at any strength); 1,500 derm-sample images: at most 4.8
    max_grain: float = 10.0
    min_contrast: float = 20.0  # 99th minus 1st grey percentile: below = low contrast
    # 90th percentile of per-pixel chroma (max - min of R, G, B): below = a greyscale picture
    # (scans, X-ray/MRI, black-and-white photos); all 13,085 derm-sample images: at least 6
    min_colour: float = 3.0

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if not (isinstance(value, int | float) and np.isfinite(value) and value >= 0):
                raise ValueError(
                    f"quality threshold {item.name} must be a number >= 0, got {value!r}"
                )
        if self.analysis_size < 16 or not 2 <= self.flat_levels <= 256:
            raise ValueError("analysis_size must be >= 16 and flat_levels in 2..256")
        if not 0 < self.flat_centre <= 1:
            raise ValueError(f"flat_centre must be in (0, 1], got {self.flat_centre}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> QualityThresholds:
        """Defaults overridden by `mapping` (e.g. a config section); unknown keys are an error."""
        mapping = dict(mapping or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - set(fields))
        if unknown:
            raise ValueError(f"unknown quality thresholds {unknown}; known: {sorted(fields)}")
        try:
            values = {
                k: int(v) if fields[k].type == "int" else float(v) for k, v in mapping.items()
            }
        except (TypeError, ValueError):
            raise ValueError(f"quality thresholds must be numbers, got {mapping}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class QualityReport:
    """ok is False when any check trips; reasons say the measured value and the limit."""

    ok: bool
    reasons: list[str] = field(default_factory=list)
    measures: dict[str, float] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # check names, for counting trip rates

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Every check's name and the reason it gives, filled in from the measures (`measure_quality`),
# the thresholds (`QualityThresholds`), the image's width and height and its grain.
REASONS: dict[str, str] = {
    "too_small": "too small: {width}x{height} px, the short side must be at least "
    "{min_short_side} px",
    "aspect_ratio": "extreme aspect ratio: {aspect_ratio:.2f}:1, at most {max_aspect_ratio:g}:1",
    "blank": "nearly uniform or blank: grey-level spread {grey_std:.1f}, at least "
    "{min_grey_std:g} expected",
    "flat": "looks like a screen, document or graphic: one flat colour covers {flat_share:.0%} "
    "of its centre (at most {max_flat_share:.0%})",
    "dark": "too dark: even its brightest tenth is below grey level {brightness:.0f} of 255, at "
    "least {min_brightness:g} expected",
    "over_exposed": "over-exposed: {clipped_share:.0%} of pixels are blown-out white (at most "
    "{max_clipped_share:.0%})",
    "blurred": "too blurred: sharpness {sharpness:.1f} (variance of the Laplacian), at least "
    "{min_sharpness:g}",
    "noisy": "too noisy or grainy: Laplacian variance {sharpness:.0f} (at most "
    "{max_sharpness:g}), {grain:.1f}x the grey variance (at most {max_grain:g}x)",
    "low_contrast": "low contrast: grey range {contrast:.0f} of 255, at least {min_contrast:g}",
    "greyscale": "no colour: a greyscale picture (chroma {colour:.1f} of 255 in its most "
    "colourful tenth, at least {min_colour:g}); dermoscopy is in colour",
}
CHECKS = tuple(REASONS)  # size first, then light (blank .. over_exposed), then detail


def measure_quality(
    image: np.ndarray, size: int = 128, levels: int = 64, centre: float = 0.7
) -> dict[str, float]:
    """The numbers the checks compare (a few ms for a 600x450 image).

    Dermatoscopes often leave a black circular frame round the field of view, so the two
    measures a frame would distort ignore it: the flat-colour share is counted in the central
    box, and brightness is the 90th grey percentile (the lit field), not the mean.
    """
    if not (
        isinstance(image, np.ndarray)
        and image.dtype == np.uint8
        and image.ndim == 3
        and image.shape[2] == 3
        and min(image.shape[:2]) >= 1
    ):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {got}")
    height, width = image.shape[:2]
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    grey_levels = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    low, bright, high = grey_percentiles(grey_levels, (1, 90, 99))
    grey = grey_levels.astype(np.float32)
    chroma = np.ptp(small, axis=2)  # per pixel: max - min over R, G, B
    # Nearest-neighbour sampling keeps a screen's flat colours exact (area averaging would blend
    # text into the background); quantising to `levels` survives JPEG's small errors.
    dy, dx = int(height * (1 - centre) / 2), int(width * (1 - centre) / 2)
    middle = image[dy : height - dy, dx : width - dx]
    sampled = cv2.resize(middle, (size, size), interpolation=cv2.INTER_NEAREST)
    return {
        "short_side": float(min(height, width)),
        "aspect_ratio": float(max(height, width) / min(height, width)),
        "grey_std": float(grey.std()),
        "flat_share": commonest_colour_share(sampled, levels),
        "brightness": float(bright),
        "clipped_share": float((grey >= 250).mean()),
        "sharpness": float(cv2.Laplacian(grey, cv2.CV_32F, ksize=1).var()),
        "contrast": float(high - low),
        "colour": float(np.percentile(chroma, 90)),
    }


def assess_quality(image: np.ndarray, thresholds: QualityThresholds | None = None) -> QualityReport:
    """Run every check on an RGB uint8 (H, W, 3) image; each failed one gives its reason."""
    t = thresholds or QualityThresholds()
    m = measure_quality(image, t.analysis_size, t.flat_levels, t.flat_centre)
    grain = m["sharpness"] / max(m["grey_std"], 1e-6) ** 2
    values = {**m, **t.to_dict(), "width": image.shape[1], "height": image.shape[0], "grain": grain}
    failed = _tripped(m, t, grain)
    reasons = [REASONS[check].format(**values) for check in failed]
    return QualityReport(ok=not failed, reasons=reasons, measures=m, failed=failed)


def _tripped(m: dict[str, float], t: QualityThresholds, grain: float) -> list[str]:
    """The checks an image fails, in `CHECKS` order. A too-small image is judged on its size
    alone (its content measures would describe an upscaled smudge); a blank one is not also
    called blurred, noisy, low in contrast or greyscale, which follow from it."""
    too_small = m["short_side"] < t.min_short_side
    blank = m["grey_std"] < t.min_grey_std
    fails = {
        "too_small": too_small,
        "aspect_ratio": m["aspect_ratio"] > t.max_aspect_ratio,
        "blank": blank,
        "flat": m["flat_share"] > t.max_flat_share and not blank,
        "dark": m["brightness"] < t.min_brightness,
        "over_exposed": m["clipped_share"] > t.max_clipped_share,
        "blurred": m["sharpness"] < t.min_sharpness,
        "noisy": m["sharpness"] > t.max_sharpness or grain > t.max_grain,
        "low_contrast": m["contrast"] < t.min_contrast,
        "greyscale": m["colour"] < t.min_colour,
    }
    judged = CHECKS[:2] if too_small else CHECKS[:6] if blank else CHECKS
    return [check for check in judged if fails[check]]


def grey_percentiles(grey: np.ndarray, percents: tuple[float, ...]) -> list[float]:
    """`np.percentile(grey, percents)` (linear interpolation) of a uint8 image, read off its
    256-bin histogram instead of sorting every pixel: the same numbers, 4x faster."""
    ranks = np.cumsum(np.bincount(grey.ravel(), minlength=256))
    last = grey.size - 1
    values = []
    for percent in percents:
        position = last * percent / 100.0
        below = int(position)
        # the grey level of the k-th smallest pixel: the first level whose count passes k
        low, high = np.searchsorted(ranks, [below, min(below + 1, last)], side="right")
        values.append(float(low + (high - low) * (position - below)))
    return values


def commonest_colour_share(image: np.ndarray, levels: int) -> float:
    """Share of the pixels of an RGB uint8 image in its most common colour, each channel
    quantised to `levels` steps (a 3-D histogram; above 64 levels its 4 bytes per cell would
    outgrow the image, so the colours are counted by sorting instead)."""
    if levels <= 64:
        counts = cv2.calcHist([image], [0, 1, 2], None, [levels] * 3, [0, 256] * 3)
        return float(counts.max()) / (image.shape[0] * image.shape[1])
    codes = (image.astype(np.int32) * levels // 256) @ np.array([levels * levels, levels, 1])
    _, counts = np.unique(codes, return_counts=True)
    return float(counts.max() / codes.size)
