"""How the trust layer shows in the API: answers that JSON can carry, and what each model's gate
and prediction sets are (for `/v1/models`).

The gate and the sets are computed by dermanet.inference / dermanet.trust; this module only
presents them. JSON has no NaN or infinity (Starlette refuses them with a 500), so non-finite
numbers become `null`, the same convention as the `gate` field's `ood_score`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dermanet.answer import finite_number
from dermanet.inference.predictor import Predictor

REEXPORT = "re-export with jobs/evaluate.py --export to fit them"
NO_OOD = f"quality checks only: no OOD statistics, {REEXPORT}"
NO_SETS = f"none: no conformal statistics, {REEXPORT}"


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def model_trust(predictor: Predictor) -> dict[str, Any]:
    """`{"gate": {...}, "prediction_sets": {...}}` of a loaded model, from its checkpoint's
    trust statistics: which checks its gate runs (OOD method and threshold, or quality checks
    only) and how its sets were calibrated (method, coverage, calibration images)."""
    trust = predictor.checkpoint.trust
    ood = trust.get("ood") or {}
    sets = trust.get("conformal") or {}
    gate: dict[str, Any] = {"description": NO_OOD, "ood_method": None, "ood_threshold": None}
    if ood:
        gate = {
            "description": predictor.gate_description,
            "ood_method": str(ood.get("method")),
            "ood_threshold": finite_number(ood.get("threshold")),
            "val_rejection_rate": finite_number(ood.get("val_rejection_rate")),
            # what a refused image, cleaned of hair and ink, must score (None: no second look)
            "second_look_threshold": finite_number(ood.get("second_look_threshold")),
        }
    calibration: dict[str, Any] = {"description": NO_SETS, "method": None, "coverage": None}
    if sets:
        coverage = finite_number(sets.get("coverage"))
        n = sets.get("n_calibration")
        shown = f"{coverage * 100:.0f} %" if coverage is not None else "unknown"
        calibration = {
            "description": f"split conformal ({sets.get('method')}), {shown} coverage"
            + (f", calibrated on {n} val images" if isinstance(n, int) else ""),
            "method": str(sets.get("method")),
            "coverage": coverage,
            "n_calibration": n if isinstance(n, int) else None,
        }
    return json_safe({"gate": gate, "prediction_sets": calibration})
