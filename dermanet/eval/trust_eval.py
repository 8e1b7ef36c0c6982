"""The trust layer at export and evaluation: fit the gate and the sets, and measure them.

`jobs/evaluate.py --export` refits the OOD statistics (train features, threshold on val) and the
conformal sets (val) for the model it ships, so gate and sets always match the weights; the
report then says how often the gate refuses the evaluated split, how well the sets cover it,
and, with `--ood DIR` (a set from `python -m tools.build_ood_set`), how much of a
non-dermoscopic set the gate refuses and the OOD AUROC.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import ray.data
import torch

from dermanet.classes import CLASS_NAMES
from dermanet.data.images import ImageDecodeError
from dermanet.data.pipelines import encoded_image
from dermanet.inference.checkpoint import LoadedCheckpoint
from dermanet.inference.features import iter_images
from dermanet.inference.predictor import Predictor, Preprocessing
from dermanet.trust.conformal import prediction_sets
from dermanet.trust.evaluation import gate_scores, ood_report, refusal_report, set_report
from dermanet.trust.fit import calibrated_probabilities, fit_trust_statistics
from dermanet.trust.ood import DEFAULT_OOD_FPR, DEFAULT_OOD_METHOD, ood_scores

log = logging.getLogger(__name__)


def fit_trust(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    temperature: float,
    *,
    ood_method: str = DEFAULT_OOD_METHOD,
    ood_fpr: float = DEFAULT_OOD_FPR,
    views: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = (),
) -> dict[str, Any]:
    """OOD statistics + conformal thresholds for the checkpoint (see dermanet.trust.fit)."""
    stats = fit_trust_statistics(
        train_features, train_labels, val_features, val_logits, val_labels, temperature,
        ood_method=ood_method, target_fpr=ood_fpr, views=views,
    )  # fmt: skip
    log.info(
        "trust: OOD %s threshold %.4g (%.0f%% of val above), sets %s at %.0f%% coverage",
        stats["ood"]["method"], float(stats["ood"]["threshold"]),
        100 * float(stats["ood"]["val_rejection_rate"]), stats["conformal"]["method"],
        100 * float(stats["conformal"]["coverage"]),
    )  # fmt: skip
    return stats


VIGNETTE_FRACTIONS = (0.85, 1.3)  # frame diameter / the image's short side, drawn per image


def vignette(images: torch.Tensor, black: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """`images` (N, 3, H, W) seen through a contact dermatoscope's round field of view: black
    (`black`, the normalised value of a black pixel, per channel) outside a centred circle of
    diameter `fractions` x the short side, with a soft edge of 3 % of it."""
    n, _, h, w = images.shape
    yy = torch.arange(h, dtype=torch.float32).view(1, h, 1) - (h - 1) / 2
    xx = torch.arange(w, dtype=torch.float32).view(1, 1, w) - (w - 1) / 2
    side = float(min(h, w))
    radius = fractions.view(n, 1, 1).float() * side / 2
    inside = ((radius - torch.sqrt(yy * yy + xx * xx)) / (0.03 * side) + 0.5).clamp(0, 1)
    inside = inside.unsqueeze(1).to(images.dtype)
    return images * inside + black.view(1, -1, 1, 1).to(images.dtype) * (1 - inside)


def vignette_image(image: np.ndarray, fraction: float) -> np.ndarray:
    """An RGB uint8 image framed like `vignette` (black outside the circle): the same view
    for decoded uploads, in benchmarks and tests."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    framed = vignette(x, torch.zeros(3), torch.tensor([float(fraction)]))
    return framed[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


class _Vignetted(torch.nn.Module):
    """The model looking at every image through a dermatoscope's round frame (seeded sizes)."""

    def __init__(self, model: torch.nn.Module, black: torch.Tensor, seed: int = 0):
        super().__init__()
        self.model, self.black = model, black
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor):
        low, high = VIGNETTE_FRACTIONS
        fractions = low + (high - low) * torch.rand(len(x), generator=self.generator)
        return self.model(vignette(x, self.black, fractions))


def with_vignette(loaded: LoadedCheckpoint, seed: int = 0) -> LoadedCheckpoint:
    """The checkpoint whose model sees vignetted views: their train and val features are the
    gate's second reference view (`fit_trust`'s `views`), since round black frames are
    ordinary dermoscopy (HAM10000 is full of them) that a gate fitted on plain views alone
    refused (a third of test images framed at the short side)."""
    mean, std = torch.tensor(loaded.mean), torch.tensor(loaded.std)
    return dataclasses.replace(loaded, model=_Vignetted(loaded.model, -mean / std, seed))


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
    """An RGB uint8 image with `artefact_overlay`'s draw for `seed`: the benchmark's third
    reference view (docs/trust.md measures it against the shipped two)."""
    alpha, colour = artefact_overlay(*image.shape[:2], np.random.default_rng(seed))
    mixed = image * (1 - alpha[..., None]) + colour * alpha[..., None]
    return mixed.round().clip(0, 255).astype(np.uint8)


def quality_ok(
    dataset: ray.data.Dataset, index: np.ndarray, preprocessing: Preprocessing
) -> np.ndarray:
    """The quality checks on each row as the server runs them (its reduced-scale decode and
    thresholds, `Preprocessing`), in `index` order; an undecodable row fails them."""
    verdict: dict[int, bool] = {}
    for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
        for row, row_index in enumerate(batch["index"]):
            try:
                image = preprocessing.decode(encoded_image(batch, row))
                verdict[int(row_index)] = preprocessing.assess(image).ok
            except (ImageDecodeError, OSError):
                verdict[int(row_index)] = False
    return np.array([verdict.get(int(i), False) for i in index])


def trust_report(
    loaded: LoadedCheckpoint,
    logits: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    quality: np.ndarray,
    ood_dir: str | None,
    origins: np.ndarray | None = None,
) -> dict[str, Any]:
    """Gate refusals and set coverage on the evaluated images, also per class and (with
    `origins`) per image source; the OOD set when given."""
    stats = loaded.trust
    report: dict[str, Any] = {"quality_rejected": float(1.0 - quality.mean())}
    threshold = float(stats["ood"]["threshold"]) if stats.get("ood") else np.inf
    in_scores = (
        ood_scores(stats["ood"], features, logits) if stats.get("ood") else np.zeros(len(labels))
    )
    gate_in = gate_scores(quality, in_scores)
    report["gate_rejected"] = float((gate_in > threshold).mean())
    sets = None
    if stats.get("conformal"):
        sets = prediction_sets(
            calibrated_probabilities(logits, loaded.temperature), stats["conformal"]
        )
        report["sets"] = set_report(sets, labels, CLASS_NAMES)
        report["sets"]["target_coverage"] = float(stats["conformal"]["coverage"])
    report.update(refusal_report(gate_in > threshold, labels, CLASS_NAMES, sets, origins))
    if ood_dir:
        report["ood_set"] = ood_set_report(loaded, gate_in, threshold, ood_dir)
    return report


def ood_set_report(
    loaded: LoadedCheckpoint, gate_in: np.ndarray, threshold: float, ood_dir: str
) -> dict[str, Any]:
    """The served path's gate (decoder, quality checks, OOD score) over a non-dermoscopic set."""
    manifest = read_ood_manifest(ood_dir)
    predictor = Predictor(loaded, backend="auto")  # the served backend
    scores = []
    for start in range(0, len(manifest), 32):
        images = list(iter_images(manifest["file"][start : start + 32], predictor.decode))
        logits, features = predictor.forward(images)
        ood = (
            ood_scores(loaded.trust["ood"], features, logits)
            if loaded.trust.get("ood")
            else np.zeros(len(images))
        )
        scores.append(gate_scores([predictor.assess(im).ok for im in images], ood))
    return ood_report(gate_in, np.concatenate(scores), threshold, manifest["kind"].tolist())


def read_ood_manifest(folder: str | Path) -> pd.DataFrame:
    """An OOD set's manifest (`python -m tools.build_ood_set` writes it) with an absolute
    `file` column; a clear error when the folder is not one."""
    folder = Path(folder)
    path = folder / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: build the set with "
            f"`python -m tools.build_ood_set --output {folder}`"
        )
    manifest = pd.read_csv(path)
    manifest["file"] = [str(folder / p) for p in manifest["path"]]
    return manifest
