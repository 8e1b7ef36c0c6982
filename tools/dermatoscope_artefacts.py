"""Synthetic dermatoscope artefacts (hair, marker ink, rulers) drawn on dermoscopic images.

`benchmarks/trust_gate.py` uses them as a third reference view of the gate and measures it
against the shipped two (docs/trust.md); nothing at run time draws them.
"""

from __future__ import annotations

import cv2
import numpy as np

HAIR_STRANDS = (4, 40)  # strands per image, drawn per image (dense hair is common)
INK_SHARE, RULER_SHARE = 0.3, 0.25  # images that also get marker ink, a ruler


def artefact_overlay(
    height: int, width: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """What a dermatoscope adds on top of the skin, as (alpha (H, W) float32 in [0, 1],
    colour (H, W, 3) float32 RGB 0-255): thin dark curved hairs on every image, purple or blue
    marker ink (dots and short strokes) and a ruler's straight line with ticks on some. Sizes
    scale with the image, so a 150 px and a 6000 px image get the same picture."""
    side = float(min(height, width))
    alpha = np.zeros((height, width), np.float32)
    colour = np.zeros((height, width, 3), np.float32)

    def draw(points: np.ndarray, rgb: np.ndarray, opacity: float, thickness: int) -> None:
        low = np.maximum(np.floor(points.min(0)) - thickness - 1, 0).astype(int)
        high = np.minimum(np.ceil(points.max(0)) + thickness + 2, (width, height)).astype(int)
        if (high <= low).any():
            return  # off the image
        box = (slice(low[1], high[1]), slice(low[0], high[0]))  # only the stroke's pixels
        mask = np.zeros((high[1] - low[1], high[0] - low[0]), np.uint8)
        cv2.polylines(mask, [np.round(points - low).astype(np.int32)], False, 255, thickness,
                      cv2.LINE_AA)  # fmt: skip
        a = mask.astype(np.float32)[..., None] / 255 * opacity
        colour[box] = colour[box] * (1 - a) + rgb * a  # premultiplied "over"
        alpha[box] = a[..., 0] + alpha[box] * (1 - a[..., 0])

    t = np.linspace(0, 1, 24)[:, None]
    for _ in range(rng.integers(*HAIR_STRANDS, endpoint=True)):
        start = rng.uniform(0, 1, 2) * (width, height)
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 1.2) * side
        end = start + length * np.array([np.cos(angle), np.sin(angle)])
        bend = (start + end) / 2 + rng.normal(0, 0.2 * length, 2)  # a quadratic Bezier curve
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end
        shade = rng.uniform(10, 90)
        rgb = np.array([shade, shade * rng.uniform(0.6, 0.85), shade * rng.uniform(0.4, 0.7)])
        draw(curve, rgb, rng.uniform(0.6, 1.0), max(1, round(side * rng.uniform(0.003, 0.009))))
    if rng.random() < INK_SHARE:
        rgb = np.array([rng.uniform(90, 150), rng.uniform(40, 90), rng.uniform(150, 220)])
        for _ in range(rng.integers(1, 8, endpoint=True)):
            centre = rng.uniform(0.05, 0.95, 2) * (width, height)
            stroke = centre + np.cumsum(rng.normal(0, 0.02 * side, (rng.integers(2, 8), 2)), 0)
            draw(stroke, rgb, rng.uniform(0.6, 0.95), max(2, round(side * rng.uniform(0.01, 0.03))))
    if rng.random() < RULER_SHARE:
        rgb = np.full(3, rng.uniform(10, 60))
        a = rng.uniform(0, 1, 2) * (width, height)
        angle = rng.uniform(0, np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        length = rng.uniform(0.3, 0.8) * side
        thickness = max(1, round(side * 0.004))
        draw(np.stack([a, a + length * direction]), rgb, 0.9, thickness)
        for k, step in enumerate(np.arange(0, length, rng.uniform(0.03, 0.06) * side)):
            tick = a + step * direction
            size = (0.05 if k % 5 == 0 else 0.025) * side
            draw(np.stack([tick, tick + size * normal]), rgb, 0.9, thickness)
    return alpha, colour / np.maximum(alpha, 1e-6)[..., None]


def artefact_image(image: np.ndarray, seed: int) -> np.ndarray:
    """An RGB uint8 image with `artefact_overlay`'s draw for `seed`."""
    alpha, colour = artefact_overlay(*image.shape[:2], np.random.default_rng(seed))
    mixed = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    return mixed.round().clip(0, 255).astype(np.uint8)
