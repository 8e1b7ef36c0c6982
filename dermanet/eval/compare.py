"""Is one model better than another on the same images, and on each image source?

Two `jobs/evaluate.py` reports of one split differ by a few points of balanced accuracy; on a
few hundred images of one source that is often resampling noise. A paired bootstrap draws the
images with replacement (the same draw for both models) and reads the spread of the
difference: an interval that excludes 0 is a difference the images support. Choosing a model
by validation, per source, is how DermaNet prefers what holds across sources.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from dermanet.classes import CLASS_NAMES
from dermanet.data.images import image_id_from_filename
from dermanet.eval.metrics import (
    MELANOMA,
    balanced_accuracy,
    macro_auroc,
    melanoma_auroc,
    per_class_recall,
)

log = logging.getLogger(__name__)
ALL_IMAGES = "all images"


def melanoma_recall(probs: np.ndarray, labels: np.ndarray) -> float:
    """The share of melanomas called MEL: a candidate can gain balanced accuracy by calling
    common classes more often and lose exactly this, the recall a screening tool lives by."""
    return float(per_class_recall(labels, np.argmax(probs, axis=1), probs.shape[1])[MELANOMA])


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "balanced_accuracy": balanced_accuracy,
    "macro_auroc": macro_auroc,
    "melanoma_auroc": melanoma_auroc,
    "melanoma_recall": melanoma_recall,
}


@dataclass(frozen=True)
class ScoredImages:
    """One report's probabilities and the truth, rows in image order."""

    images: pd.Index
    probs: np.ndarray
    labels: np.ndarray


def read_report(folder: str | Path) -> ScoredImages:
    """`predictions.csv` and `truth.csv` of a `jobs/evaluate.py --output` folder."""
    folder = Path(folder)
    frames = {}
    for name in ("predictions.csv", "truth.csv"):
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: pass a jobs/evaluate.py --output folder")
        frame = pd.read_csv(path, dtype={"image": str}).set_index("image")
        missing = [c for c in CLASS_NAMES if c not in frame.columns]
        if missing:
            raise ValueError(f"{path} lacks class columns {missing}: not an evaluate report")
        frames[name] = frame.loc[:, list(CLASS_NAMES)].sort_index()
    probs, truth = frames["predictions.csv"], frames["truth.csv"]
    if not probs.index.equals(truth.index):
        raise ValueError(f"{folder}: predictions.csv and truth.csv list different images")
    return ScoredImages(probs.index, probs.to_numpy(float), truth.to_numpy().argmax(axis=1))


def read_image_table(csv: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    """`columns` of a CSV with an `image` column (e.g. derm-sample's metadata.csv: `origin`,
    `lesion_id`), indexed by image id as the catalogue readers name images."""
    path = Path(csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in ("image", *columns) if c not in header]
    if missing:
        raise ValueError(f"{path} has no column(s) {missing}; its columns: {list(header)}")
    table = pd.read_csv(path, usecols=["image", *columns], dtype={"image": str})
    table.index = pd.Index([image_id_from_filename(i.strip()) for i in table["image"]])
    duplicated = table.index[table.index.duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"{path} lists {len(duplicated)} image ids twice, e.g. {duplicated[0]}")
    return table.loc[:, list(columns)]


def read_grouping(
    csv: str | Path, group_by: str, cluster_by: str | None = None
) -> tuple[pd.Series, pd.Series | None, str | None]:
    """Group and cluster of each image from one read of a catalogue CSV: (groups, clusters,
    the cluster column). `cluster_by` None means `lesion_id` when the CSV has it (images of
    one lesion are not independent); "none" draws single images."""
    if cluster_by is None:
        cluster_by = "lesion_id" if "lesion_id" in pd.read_csv(csv, nrows=0).columns else "none"
    if cluster_by == "none":
        return read_image_table(csv, [group_by])[group_by], None, None
    table = read_image_table(csv, list(dict.fromkeys([group_by, cluster_by])))
    return table[group_by], table[cluster_by], cluster_by


def pair_reports(baseline: ScoredImages, candidate: ScoredImages) -> None:
    """Refuse reports of different images or different truth: a paired test needs both."""
    if not baseline.images.equals(candidate.images):
        only = baseline.images.symmetric_difference(candidate.images)
        raise ValueError(
            f"the two reports score different images ({len(only)} in one only, e.g. "
            f"{list(only[:3])}): evaluate both models on the same split and data"
        )
    if not np.array_equal(baseline.labels, candidate.labels):
        raise ValueError("the two reports give different truth for the same images")


@dataclass(frozen=True)
class Difference:
    """candidate - baseline on one group of images, with its bootstrap interval."""

    group: str
    images: int
    metric: str
    baseline: float
    candidate: float
    low: float
    high: float

    @property
    def difference(self) -> float:
        return self.candidate - self.baseline

    @property
    def verdict(self) -> str:
        if math.isnan(self.low) or math.isnan(self.high):
            return "not defined"  # e.g. AUROC on a group with one class
        if self.low > 0:
            return "candidate better"
        if self.high < 0:
            return "baseline better"
        return "within noise"

    def to_dict(self) -> dict[str, object]:
        """Every field, the difference and the verdict; NaN as None (valid JSON)."""
        values = asdict(self) | {"difference": self.difference}
        nan = {k for k, v in values.items() if isinstance(v, float) and math.isnan(v)}
        return {k: None if k in nan else v for k, v in values.items()} | {"verdict": self.verdict}


def paired_bootstrap(
    baseline: ScoredImages,
    candidate: ScoredImages,
    groups: pd.Series | None = None,
    clusters: pd.Series | None = None,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    metrics: Sequence[str] = tuple(METRICS),
    progress: bool = True,
) -> list[Difference]:
    """Differences over all images and inside each group (e.g. origin), each with a percentile
    interval from `resamples` paired draws of that group's images.

    With `clusters` (e.g. lesion id) the draws pick whole clusters: images of one lesion are
    not independent, and drawing them one by one makes the interval too narrow. `groups` and
    `clusters` are indexed by image id; an image without a cluster is its own.
    """
    pair_reports(baseline, candidate)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError("need resamples >= 1 and 0 < confidence < 1")
    images = baseline.images
    selections = {ALL_IMAGES: np.arange(len(images))}
    if groups is not None:
        named = groups.reindex(images)
        if named.isna().all():
            raise ValueError(
                f"none of the {len(images)} scored images has a group (report ids look like "
                f"{images[0]!r}, the groups' like {groups.index[0]!r})"
            )
        if named.isna().any():
            log.warning("%d of %d images have no group", named.isna().sum(), len(images))
        for group in sorted(named.dropna().unique()):
            selections[str(group)] = np.flatnonzero((named == group).to_numpy())
    units = images.to_numpy(dtype=object)
    if clusters is not None:
        units = clusters.reindex(images).fillna(pd.Series(images, index=images)).to_numpy()
    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2 * 100
    labels = baseline.labels
    out = []
    for group, rows in tqdm(selections.items(), desc="bootstrap", disable=not progress):
        draws = _cluster_draws(rows, units[rows], resamples, rng)
        for metric in metrics:
            score = METRICS[metric]
            spread = np.array(
                [score(candidate.probs[s], labels[s]) - score(baseline.probs[s], labels[s])
                 for s in draws]
            )  # fmt: skip
            finite = spread[np.isfinite(spread)]
            low, high = np.percentile(finite, [tail, 100 - tail]) if len(finite) else (np.nan,) * 2
            out.append(
                Difference(
                    group, len(rows), metric,
                    score(baseline.probs[rows], labels[rows]),
                    score(candidate.probs[rows], labels[rows]),
                    float(low), float(high),
                )
            )  # fmt: skip
    return out


def _cluster_draws(
    rows: np.ndarray, units: np.ndarray, resamples: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """`resamples` draws with replacement of as many units as there are, each unit bringing
    all its rows (a unit per row: the plain bootstrap)."""
    _, inverse = np.unique(units.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(rows[order], np.cumsum(np.bincount(inverse))[:-1])
    if len(members) == len(rows):  # one row per unit: draw rows directly (faster)
        return [rng.choice(rows, len(rows)) for _ in range(resamples)]
    picks = rng.integers(0, len(members), size=(resamples, len(members)))
    return [np.concatenate([members[i] for i in pick]) for pick in picks]


def markdown_table(differences: Sequence[Difference], confidence: float = 0.95) -> str:
    head = (
        f"| images | n | metric | baseline | candidate | difference | {confidence:.0%} interval "
        "| verdict |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {d.group} | {d.images} | {d.metric} | {d.baseline:.3f} | {d.candidate:.3f} | "
        f"{d.difference:+.3f} | ({d.low:+.3f}, {d.high:+.3f}) | {d.verdict} |"
        for d in differences
    ]
    return "\n".join([head, *rows])
