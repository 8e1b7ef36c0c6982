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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
from dermanet.trust.evaluation import (
    gate_scores,
    ood_report,
    refusal_report,
    set_report,
    with_second_look,
)
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


def served_images(
    dataset: ray.data.Dataset, preprocessing: Preprocessing, wanted: set[int] | None = None
) -> Iterator[tuple[int, np.ndarray | None]]:
    """(row index, image decoded as the server decodes it, or None when unreadable) for each
    row of `dataset` (only the `wanted` row indices when given)."""
    for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
        for row, row_index in enumerate(batch["index"]):
            if wanted is not None and int(row_index) not in wanted:
                continue
            try:
                yield int(row_index), preprocessing.decode(encoded_image(batch, row))
            except (ImageDecodeError, OSError):
                yield int(row_index), None


def quality_ok(
    dataset: ray.data.Dataset, index: np.ndarray, preprocessing: Preprocessing
) -> np.ndarray:
    """The quality checks on each row as the server runs them (its reduced-scale decode and
    thresholds, `Preprocessing`), in `index` order; an undecodable row fails them."""
    verdict = {
        row: image is not None and preprocessing.assess(image).ok
        for row, image in served_images(dataset, preprocessing)
    }
    return np.array([verdict.get(int(i), False) for i in index])


def second_look(
    predictor: Predictor, dataset: ray.data.Dataset, index: np.ndarray, gate: np.ndarray
) -> np.ndarray:
    """The gate scores (`gate_scores`, rows in `index` order) after the server's second look:
    each row the OOD score alone refused is decoded again, cleaned and scored
    (`Predictor.cleaned_ood_scores`)."""
    stats = predictor.checkpoint.trust.get("ood") or {}
    if "second_look_threshold" not in stats:
        return gate
    threshold = float(stats["threshold"])
    position = {int(row): i for i, row in enumerate(index)}
    refused = {int(index[i]) for i in np.flatnonzero(np.isfinite(gate) & (gate > threshold))}
    second = np.full(len(gate), np.nan)
    rows, images = [], []
    for row, image in served_images(dataset, predictor.preprocessing, refused):
        if image is not None:
            rows.append(position[row])
            images.append(image)
    if images:
        second[rows] = predictor.cleaned_ood_scores(images)
    return with_second_look(gate, threshold, second, float(stats["second_look_threshold"]))


def trust_report(
    loaded: LoadedCheckpoint,
    logits: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    quality: np.ndarray,
    ood_dir: str | None,
    origins: np.ndarray | None = None,
    rows: tuple[ray.data.Dataset, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Gate refusals and set coverage on the evaluated images, also per class and (with
    `origins`) per image source; the OOD set when given. With `rows` (the images' dataset and
    their row indices in order), the gate's second look too, as the server runs it."""
    stats = loaded.trust
    report: dict[str, Any] = {"quality_rejected": float(1.0 - quality.mean())}
    threshold = float(stats["ood"]["threshold"]) if stats.get("ood") else np.inf
    in_scores = (
        ood_scores(stats["ood"], features, logits) if stats.get("ood") else np.zeros(len(labels))
    )
    gate_in = gate_scores(quality, in_scores)
    # the served backend, one for the second look and the OOD set
    predictor = Predictor(loaded, backend="auto") if rows is not None or ood_dir else None
    if rows is not None:
        gate_in = second_look(predictor, rows[0], rows[1], gate_in)
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
        report["ood_set"] = ood_set_report(predictor, gate_in, threshold, ood_dir)
    return report


def ood_set_report(
    predictor: Predictor, gate_in: np.ndarray, threshold: float, ood_dir: str
) -> dict[str, Any]:
    """The served path's gate (decoder, quality checks, OOD score, second look) over a
    non-dermoscopic set."""
    manifest = read_ood_manifest(ood_dir)
    scores = []
    for start in range(0, len(manifest), 32):
        images = list(iter_images(manifest["file"][start : start + 32], predictor.decode))
        scores.append(served_gate_scores(predictor, images))
    return ood_report(gate_in, np.concatenate(scores), threshold, manifest["kind"].tolist())


def served_gate_scores(predictor: Predictor, images: Sequence[np.ndarray]) -> np.ndarray:
    """One gate score per image from the served path's own answers (`gate_scores`: +inf where
    a quality check failed; 0 for a model without OOD statistics; after the second look, the
    cleaned image's score where that accepted it)."""
    prepared = [predictor.preprocessing.prepare(image) for image in images]
    quality = [p.quality.ok for p in prepared]
    if not predictor.checkpoint.trust.get("ood"):
        return gate_scores(quality, np.zeros(len(images)))
    scores = [p.gate["ood_score"] for p in predictor.predict_prepared(prepared)]
    return gate_scores(quality, np.array([np.inf if s is None else s for s in scores], float))


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
