"""Judging the gate and the sets: OOD AUROC and rejection rates both ways, per kind of
picture; coverage and set size per class; and the gate's decision for one image (the
`gate` field of the API contract)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from dermanet.trust.quality import QualityReport


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(out score > in score) + P(tie)/2 (Mann-Whitney); +inf scores (rejected before the
    model) rank highest. NaN when either side is empty."""
    a = np.asarray(in_scores, dtype=np.float64).ravel()
    b = np.asarray(out_scores, dtype=np.float64).ravel()
    if not len(a) or not len(b):
        return float("nan")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("scores contain NaN")
    ranks = rankdata(np.concatenate([a, b]))
    return float((ranks[len(a) :].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def gate_scores(quality_ok: Sequence[bool] | np.ndarray, ood_scores: np.ndarray) -> np.ndarray:
    """One score for the whole gate: +inf where a quality check failed, else the OOD score.

    `score > threshold` is then exactly the gate's rejection (quality fails OR OOD above).
    """
    ok = np.asarray(quality_ok, dtype=bool)
    scores = np.asarray(ood_scores, dtype=np.float64)
    if ok.shape != scores.shape:
        raise ValueError(f"{ok.shape[0]} quality results for {scores.shape[0]} OOD scores")
    return np.where(ok, scores, np.inf)


def ood_report(
    in_scores: np.ndarray,
    out_scores: np.ndarray,
    threshold: float,
    out_kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """AUROC (out vs in) and the share rejected (score > threshold) on each side, per kind.

    `in_scores`: in-distribution images (the test split); `out_scores`: non-dermoscopic ones.
    """
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.asarray(out_scores, dtype=np.float64)
    report: dict[str, Any] = {
        "auroc": auroc(a, b),
        "threshold": float(threshold),
        "n_in": len(a),
        "n_out": len(b),
        "in_rejected": float((a > threshold).mean()) if len(a) else float("nan"),
        "out_rejected": float((b > threshold).mean()) if len(b) else float("nan"),
        "per_kind": {},
    }
    if out_kinds is not None:
        kinds = np.asarray(out_kinds, dtype=str)
        if kinds.shape != b.shape:
            raise ValueError(f"{len(kinds)} kinds for {len(b)} out-of-distribution scores")
        for kind in sorted(set(kinds)):
            chosen = b[kinds == kind]
            report["per_kind"][kind] = {
                "n": len(chosen),
                "rejected": float((chosen > threshold).mean()),
                "auroc": auroc(a, chosen),
            }
    return report


def set_report(
    sets: Sequence[Sequence[int]], labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Empirical coverage (truth in the set), mean set size, and both per true class."""
    labels = np.asarray(labels)
    if len(sets) != len(labels):
        raise ValueError(f"{len(sets)} sets for {len(labels)} labels")
    covered = np.array([int(y) in s for s, y in zip(sets, labels, strict=True)])
    sizes = np.array([len(s) for s in sets])
    per_class = {}
    for k, name in enumerate(class_names):
        rows = labels == k
        per_class[name] = {
            "n": int(rows.sum()),
            "coverage": float(covered[rows].mean()) if rows.any() else float("nan"),
            "mean_size": float(sizes[rows].mean()) if rows.any() else float("nan"),
        }
    return {
        "n": len(labels),
        "coverage": float(covered.mean()) if len(labels) else float("nan"),
        "mean_size": float(sizes.mean()) if len(labels) else float("nan"),
        "singletons": float((sizes == 1).mean()) if len(labels) else float("nan"),
        "per_class": per_class,
    }


def refusal_report(
    refused: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    sets: Sequence[Sequence[int]] | None = None,
    groups: Sequence[str] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Per true class (and per group, e.g. the image source): images, share the gate refused,
    and on the images it accepted the sets' coverage and mean size. A gate can refuse 4 % of
    all images while refusing most of one rare class; only this breakdown shows it."""
    refused = np.asarray(refused, dtype=bool)
    labels = np.asarray(labels)
    if refused.shape != labels.shape:
        raise ValueError(f"{len(refused)} gate decisions for {len(labels)} labels")
    covered = sizes = None
    if sets is not None:
        if len(sets) != len(labels):
            raise ValueError(f"{len(sets)} sets for {len(labels)} labels")
        covered = np.array([int(y) in s for s, y in zip(sets, labels, strict=True)], dtype=bool)
        sizes = np.array([len(s) for s in sets], dtype=float)

    def row(rows: np.ndarray) -> dict[str, Any]:
        accepted = rows & ~refused
        nan = float("nan")
        out = {"n": int(rows.sum()), "refused": float(refused[rows].mean()) if rows.any() else nan}
        if covered is not None:
            out["coverage"] = float(covered[accepted].mean()) if accepted.any() else nan
            out["mean_size"] = float(sizes[accepted].mean()) if accepted.any() else nan
        return out

    report = {"per_class": {name: row(labels == k) for k, name in enumerate(class_names)}}
    if groups is not None:
        groups = np.asarray(groups, dtype=str)
        if groups.shape != labels.shape:
            raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
        report["per_source"] = {g: row(groups == g) for g in sorted(set(groups))}
    return report


SECOND_LOOK = "quality checks + OOD score of the image with hair and ink marks painted out"


def second_look_gate(first: dict[str, Any], score: float, threshold: float) -> dict[str, Any]:
    """The `gate` field after the second look (`dermanet.trust.cleaning`) at an image the first
    look refused on its OOD score alone: accepted, with the cleaned image's score and the
    second look's threshold, when that score is within it; else the first verdict."""
    if not (math.isfinite(score) and score <= threshold):
        return first
    return {
        "accepted": True,
        "reasons": [],
        "ood_score": float(score),
        "ood_threshold": float(threshold),
        "checks": f"{SECOND_LOOK} (as uploaded: OOD score {first['ood_score']:.3g} > "
        f"{first['ood_threshold']:.3g})",
    }


def with_second_look(
    gate: np.ndarray, threshold: float, second: np.ndarray, second_threshold: float
) -> np.ndarray:
    """Gate scores (`gate_scores`) after the second look: the cleaned image's score where it
    is within `second_threshold` (never above `threshold`), else the first. `second` is NaN
    for images not looked at again; `score > threshold` stays exactly the refusal."""
    gate = np.asarray(gate, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    if gate.shape != second.shape:
        raise ValueError(f"{len(second)} second-look scores for {len(gate)} gate scores")
    rescued = (gate > threshold) & np.isfinite(gate) & (second <= min(second_threshold, threshold))
    return np.where(rescued, second, gate)


def gate_decision(
    quality_report: QualityReport, ood_score: float | None, ood_threshold: float | None
) -> dict[str, Any]:
    """The API's `gate` field: {"accepted", "reasons", "ood_score", "ood_threshold"}.

    `ood_score`/`ood_threshold` are None when not computed (a model without OOD statistics,
    or an image the quality checks already refused); a non-finite score is rejected and
    reported as None, since JSON has no infinity.
    """
    reasons = list(quality_report.reasons)
    score = None if ood_score is None else float(ood_score)
    threshold = None if ood_threshold is None else float(ood_threshold)
    if score is not None and threshold is not None:
        if not math.isfinite(score):
            reasons.append("unlike the training images (OOD score not finite)")
            score = None
        elif score > threshold:
            reasons.append(
                f"unlike the training images (OOD score {score:.3g} > threshold {threshold:.3g})"
            )
    return {
        "accepted": quality_report.ok and not reasons,
        "reasons": reasons,
        "ood_score": score,
        "ood_threshold": threshold,
    }
