"""One call that fits everything the trust layer stores in a checkpoint.

Export (and the benchmark) run the model over the train and val splits once, then call
`fit_trust_statistics`: the OOD detector (train features, threshold on val) and the conformal
sets (val probabilities) are refitted together whenever a model is (re)exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import softmax

from dermanet.trust.conformal import (
    DEFAULT_CONFORMAL_DELTA,
    DEFAULT_CONFORMAL_MARGIN,
    DEFAULT_CONFORMAL_METHOD,
    fit_conformal,
)
from dermanet.trust.ood import DEFAULT_OOD_FPR, DEFAULT_OOD_METHOD, fit_ood_detector


def calibrated_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T), float64: what Predictor serves."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def fit_trust_statistics(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    temperature: float = 1.0,
    *,
    ood_method: str = DEFAULT_OOD_METHOD,
    target_fpr: float = DEFAULT_OOD_FPR,
    set_method: str = DEFAULT_CONFORMAL_METHOD,
    coverage: float = 0.9,
    set_delta: float | None = DEFAULT_CONFORMAL_DELTA,
    set_margin: float = DEFAULT_CONFORMAL_MARGIN,
    views: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]] = (),
) -> dict[str, Any]:
    """{"ood": OOD statistics with threshold, "conformal": set statistics}; plain types and
    tensors only, so the dict can go into a `weights_only` checkpoint as it is.

    `views`: (train features, val features, val logits) of the same train and val images
    seen another way (e.g. through a dermatoscope's round frame, `dermanet.eval.trust_eval.
    with_vignette`): the OOD score then treats such views as in distribution
    (`fit_ood_detector`). The OOD threshold holds `target_fpr` for every val class."""
    probs = calibrated_probabilities(val_logits, temperature)
    return {
        "ood": fit_ood_detector(
            train_features,
            train_labels,
            val_features,
            val_logits,
            ood_method,
            target_fpr,
            val_labels=val_labels,
            views=views,
        ),
        "conformal": fit_conformal(probs, val_labels, coverage, set_method, set_delta, set_margin),
    }
