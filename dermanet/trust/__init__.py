"""Know when not to answer: image-quality checks, an out-of-distribution score on the model's
features, conformal prediction sets, and the evaluation set and measures that judge them.

Pure functions on numpy arrays and plain dicts; serving, export and the dashboard call them.
The gate looks twice: an image refused on its OOD score alone is scored again with its hair
and ink marks painted out (`cleaning`).
Features and logits through the Predictor are `dermanet.inference.features` (inference sits
above this package and uses it).
See docs/trust.md.
"""

from dermanet.trust.cleaning import artefact_mask, remove_artefacts
from dermanet.trust.conformal import (
    CONFORMAL_METHODS,
    DEFAULT_CONFORMAL_DELTA,
    DEFAULT_CONFORMAL_MARGIN,
    DEFAULT_CONFORMAL_METHOD,
    fit_conformal,
    prediction_sets,
)
from dermanet.trust.evaluation import (
    auroc,
    gate_decision,
    gate_scores,
    ood_report,
    refusal_report,
    second_look_gate,
    set_report,
    with_second_look,
)
from dermanet.trust.fit import calibrated_probabilities, fit_trust_statistics
from dermanet.trust.ood import (
    DEFAULT_OOD_FPR,
    DEFAULT_OOD_METHOD,
    OOD_METHODS,
    fit_ood_detector,
    ood_scores,
    stats_nbytes,
)
from dermanet.trust.quality import (
    CHECKS,
    QualityReport,
    QualityThresholds,
    assess_quality,
    measure_quality,
)

__all__ = [
    "CHECKS",
    "CONFORMAL_METHODS",
    "DEFAULT_CONFORMAL_DELTA",
    "DEFAULT_CONFORMAL_MARGIN",
    "DEFAULT_CONFORMAL_METHOD",
    "DEFAULT_OOD_FPR",
    "DEFAULT_OOD_METHOD",
    "OOD_METHODS",
    "QualityReport",
    "QualityThresholds",
    "artefact_mask",
    "assess_quality",
    "auroc",
    "calibrated_probabilities",
    "fit_conformal",
    "fit_ood_detector",
    "fit_trust_statistics",
    "gate_decision",
    "gate_scores",
    "measure_quality",
    "ood_report",
    "ood_scores",
    "prediction_sets",
    "refusal_report",
    "remove_artefacts",
    "second_look_gate",
    "set_report",
    "stats_nbytes",
    "with_second_look",
]
