"""The risk score and traffic light (the risk contract), as one configurable policy object.

risk = Σ weight_c · P(c) over the malignant classes (default 1.5·MEL + 1.3·BCC + 1.0·SCC);
green below 0.15, yellow below 0.6, red otherwise; malignant = clip(risk, 0, 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dermanet.classes import CLASS_NAMES, NUM_CLASSES

DEFAULT_RISK_WEIGHTS: dict[str, float] = {"MEL": 1.5, "BCC": 1.3, "SCC": 1.0}
TRAFFIC_LIGHTS = ("green", "yellow", "red")
ENV_WEIGHTS = "DERMANET_RISK_WEIGHTS"  # e.g. "MEL=1.5,BCC=1.3,SCC=1.0"
ENV_GREEN = "DERMANET_RISK_GREEN_BELOW"
ENV_YELLOW = "DERMANET_RISK_YELLOW_BELOW"


@dataclass(frozen=True)
class RiskAssessment:
    """One image's risk: the weighted score, its light and the two dashboard bars."""

    risk: float
    traffic_light: str
    malignant: float
    benign: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RiskPolicy:
    """Weights per class and the two light thresholds; validated so a typo cannot go unseen."""

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RISK_WEIGHTS))
    green_below: float = 0.15
    yellow_below: float = 0.6

    def __post_init__(self) -> None:
        weights = {str(k): float(v) for k, v in dict(self.weights).items()}
        unknown = sorted(set(weights) - set(CLASS_NAMES))
        if unknown:
            raise ValueError(
                f"risk weights name unknown classes {unknown}; valid classes are "
                f"{list(CLASS_NAMES)}"
            )
        if any(v < 0 for v in weights.values()):
            raise ValueError(f"risk weights must be >= 0, got {weights}")
        if not 0 <= self.green_below <= self.yellow_below:
            raise ValueError(
                "risk thresholds need 0 <= green_below <= yellow_below, got "
                f"green_below={self.green_below}, yellow_below={self.yellow_below}"
            )
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "green_below", float(self.green_below))
        object.__setattr__(self, "yellow_below", float(self.yellow_below))

    def assess(self, probabilities: Mapping[str, float] | Sequence[float]) -> RiskAssessment:
        """Score class probabilities (a name → value mapping or a vector in CLASS_NAMES order)."""
        probs = _as_mapping(probabilities)
        risk = float(sum(w * probs.get(name, 0.0) for name, w in self.weights.items()))
        if risk < self.green_below:
            light = "green"
        elif risk < self.yellow_below:
            light = "yellow"
        else:
            light = "red"
        malignant = float(np.clip(risk, 0.0, 1.0))
        return RiskAssessment(risk, light, malignant, 1.0 - malignant)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": dict(self.weights),
            "green_below": self.green_below,
            "yellow_below": self.yellow_below,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RiskPolicy:
        """From a YAML/JSON section `{weights: {...}, green_below: .., yellow_below: ..}`."""
        data = dict(data or {})
        unknown = sorted(set(data) - {"weights", "green_below", "yellow_below"})
        if unknown:
            raise ValueError(
                f"unknown risk settings {unknown}; valid: weights, green_below, yellow_below"
            )
        return cls(**data)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, base: RiskPolicy | None = None):
        """Override `base` (default policy) with DERMANET_RISK_* environment variables."""
        env = os.environ if env is None else env
        base = base or cls()
        weights = dict(base.weights)
        if env.get(ENV_WEIGHTS):
            weights = _parse_weights(env[ENV_WEIGHTS])
        return cls(
            weights=weights,
            green_below=float(env.get(ENV_GREEN, base.green_below)),
            yellow_below=float(env.get(ENV_YELLOW, base.yellow_below)),
        )


def _parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV_WEIGHTS} must look like 'MEL=1.5,BCC=1.3', got {text!r}")
        weights[name.strip()] = float(value)
    return weights


def _as_mapping(probabilities: Mapping[str, float] | Sequence[float]) -> dict[str, float]:
    if isinstance(probabilities, Mapping):
        return {str(k): float(v) for k, v in probabilities.items()}
    values = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    if values.size != NUM_CLASSES:
        raise ValueError(
            f"expected {NUM_CLASSES} probabilities in the order {list(CLASS_NAMES)}, "
            f"got {values.size}"
        )
    return dict(zip(CLASS_NAMES, values.tolist(), strict=True))
