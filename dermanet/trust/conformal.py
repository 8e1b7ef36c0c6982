"""Split conformal prediction sets: the classes among which the true one lies with a stated
probability (e.g. 90 %), fitted on val probabilities (softmax of logits / the temperature).

Methods (compared on derm-sample by benchmarks/trust_gate.py; docs/trust.md):
- `mondrian_aps` (default): class-conditional APS, one threshold per true class on the APS
  score (the probability mass of the classes at least as likely as the true one). ISIC is very
  imbalanced, and a single threshold reaches its 90 % on average by covering NV well while
  missing the rare classes; Mondrian's guarantee holds for each class (Vovk 2012). The APS
  score ranks a class by its place among the others rather than by its own probability, so it
  still covers a class whose probabilities shrink on another image source (the model gives
  HAM10000's BKL lower probabilities than the ISIC archive's).
- `mondrian`: class-conditional LAC (include class k when 1 - p_k <= q_k).
- `lac`: include class k when 1 - p_k <= q (Sadinle et al. 2019): the smallest sets on average.
- `aps`: include classes in descending probability until their mass reaches q (Romano et al.
  2020). APS here is non-randomised, so the same image always gets the same set.

`margin` (default 0.04): thresholds are fitted at `coverage + margin` while the sets keep
stating `coverage`, the nominal level. Conformal coverage holds on average for exchangeable
images; per-class thresholds from 18-31 val images of a rare class swing with the draw, and
the source changes between clinics, so the nominal level needs headroom to hold per class on
test and on a left-out source. At 0.94 a class of up to 32 calibration images gets its
largest score as threshold. `delta` (default None) is the alternative, training-conditional
margin: the order statistic that reaches the target with probability >= 1 - delta over
calibration draws (Vovk 2012); a class with too few images for it is always included, which
made the sets nearly as large as the class count.

The statistics are plain numbers and lists, storable in a `weights_only` checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import beta

CONFORMAL_METHODS = ("mondrian_aps", "mondrian", "lac", "aps")
_PER_CLASS = ("mondrian_aps", "mondrian")  # one threshold per true class
_APS_SCORE = ("mondrian_aps", "aps")
DEFAULT_CONFORMAL_METHOD = "mondrian_aps"
DEFAULT_CONFORMAL_MARGIN = 0.04  # thresholds fitted at coverage + margin, sets state coverage
DEFAULT_CONFORMAL_DELTA = None  # P(a class's coverage < target) allowed over calibration draws
CONFORMAL_STATS_VERSION = 1
_TOLERANCE = 1e-9  # scores are in [0, 1]; float error must not drop a class at the boundary


def fit_conformal(
    val_probs: np.ndarray,
    val_labels: np.ndarray,
    coverage: float = 0.9,
    method: str = DEFAULT_CONFORMAL_METHOD,
    delta: float | None = DEFAULT_CONFORMAL_DELTA,
    margin: float = DEFAULT_CONFORMAL_MARGIN,
) -> dict[str, Any]:
    """Conformal thresholds from calibration (val) probabilities and true labels.

    The threshold is the k-th smallest nonconformity score, at the level `coverage + margin`
    (`coverage` is the level the sets state). With `delta` None, k = ceil((n+1)·level):
    coverage >= level on average over calibration draws; with `delta`, the smallest k whose
    coverage is >= level with probability >= 1 - delta (coverage of the k-th of n is
    Beta(k, n+1-k)). Too few examples for that (k > n, e.g. a rare class under Mondrian)
    gives threshold 1.0: the class is always included, the safe side.
    """
    if method not in CONFORMAL_METHODS:
        raise ValueError(
            f"unknown conformal method {method!r}; choose from {list(CONFORMAL_METHODS)}"
        )
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be between 0 and 1 (e.g. 0.9), got {coverage}")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"delta must be between 0 and 1 (e.g. 0.1) or None, got {delta}")
    if not 0 <= margin < 1 - coverage:
        raise ValueError(
            f"margin must be >= 0 and coverage + margin below 1, got {coverage} + {margin}"
        )
    level = coverage + margin
    probs = _probabilities(val_probs)
    labels = np.asarray(val_labels)
    if labels.shape != (len(probs),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"val_labels must be {len(probs)} integers, got {labels.dtype} {labels.shape}"
        )
    num_classes = probs.shape[1]
    if len(probs) == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"val_labels must be class indices in 0..{num_classes - 1}")
    scores = _true_class_scores(probs, labels, method)
    stats: dict[str, Any] = {
        "version": CONFORMAL_STATS_VERSION,
        "method": method,
        "coverage": float(coverage),
        "margin": float(margin),
        "delta": None if delta is None else float(delta),
        "num_classes": int(num_classes),
        "n_calibration": len(labels),
    }
    if method in _PER_CLASS:
        counts = np.bincount(labels, minlength=num_classes)
        stats["class_counts"] = [int(c) for c in counts]
        stats["qhat"] = [
            _conformal_quantile(scores[labels == k], level, delta) for k in range(num_classes)
        ]
    else:
        stats["qhat"] = _conformal_quantile(scores, level, delta)
    return stats


def prediction_sets(probs: np.ndarray, stats: dict[str, Any]) -> list[list[int]]:
    """Class indices per image, most probable first; never empty (falls back to the top class)."""
    if not isinstance(stats, dict) or stats.get("method") not in CONFORMAL_METHODS:
        raise ValueError("not conformal statistics this dermanet understands; refit them")
    probs = _probabilities(probs)
    if probs.shape[1] != stats["num_classes"]:
        raise ValueError(
            f"probabilities have {probs.shape[1]} classes, the statistics {stats['num_classes']}"
        )
    method = stats["method"]
    qhat = np.asarray(stats["qhat"], dtype=np.float64)  # scalar, or one per class (Mondrian)
    if method in _APS_SCORE:
        included = _aps_all_scores(probs) <= qhat + _TOLERANCE
    else:
        included = 1.0 - probs <= qhat + _TOLERANCE
    order = np.argsort(-probs, axis=1, kind="stable")
    sets = []
    for row, keep in zip(order, included, strict=True):
        members = [int(k) for k in row if keep[k]]
        sets.append(members or [int(row[0])])
    return sets


def _conformal_quantile(scores: np.ndarray, coverage: float, delta: float | None = None) -> float:
    """The k-th smallest score (`fit_conformal`), taken as an order statistic:
    `np.quantile(scores, k/n, method="higher")` interpolates at position k·(n-1)/n and so
    returns the (k+1)-th, which for a class of 21 calibration images is the largest score
    (one confidently wrong image then put that class in nearly every set)."""
    n = len(scores)
    k = _order_index(n, coverage, delta)
    if k > n:  # also n = 0 (k >= 1)
        return 1.0
    return float(np.partition(np.asarray(scores, dtype=np.float64), k - 1)[k - 1])


def _order_index(n: int, coverage: float, delta: float | None) -> int:
    """1-based k of the threshold's order statistic among n scores (n + 1: none suffices)."""
    if delta is None:
        return math.ceil((n + 1) * coverage)
    ks = np.arange(1, n + 1)
    enough = beta.sf(coverage, ks, n + 1 - ks) >= 1 - delta
    return int(ks[enough][0]) if enough.any() else n + 1


def _true_class_scores(probs: np.ndarray, labels: np.ndarray, method: str) -> np.ndarray:
    rows = np.arange(len(labels))
    if method in _APS_SCORE:
        return _aps_all_scores(probs)[rows, labels]
    return 1.0 - probs[rows, labels]


def _aps_all_scores(probs: np.ndarray) -> np.ndarray:
    """For each class: the probability mass of all classes at least as likely, itself included."""
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    scores = np.empty_like(probs)
    np.put_along_axis(scores, order, cumulative, axis=1)
    return scores


def _probabilities(value: np.ndarray) -> np.ndarray:
    probs = np.asarray(value, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probabilities must be (N, classes), got shape {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    if len(probs) and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(
            "each row of probabilities must sum to 1 (pass softmax outputs, not logits)"
        )
    return probs
