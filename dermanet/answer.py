"""The answer schema: what the server, batch inference and the dashboard say about an image.

One light module (no torch, no Ray) so the dashboard can parse answers without pulling in
the model stack. `Answer` is one image's answer: `to_dict` is the JSON of `/v1/classify`,
`to_row` the flat columns of batch inference (`ROW_COLUMNS`), `from_dict` what the dashboard
reads. Every answer names the exact model file behind it (`ModelVersion`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dermanet.classes import CLASS_NAMES


@dataclass(frozen=True)
class ModelVersion:
    """Which checkpoint file answered: its registry id, the SHA-256 of its bytes as loaded, and
    when it was made (the checkpoint's own `provenance.created_utc`, or the file's mtime at
    load when the file records none)."""

    id: str
    sha256: str
    created: str

    @classmethod
    def of_bytes(
        cls, model_id: str, data: bytes, created: str | None, mtime: float | None = None
    ) -> ModelVersion:
        """The version of a checkpoint whose `data` were loaded. `created` is the file's own
        creation time (None when it records none); then the file's `mtime` (POSIX seconds),
        and for bytes without a file (a URI) the time they were loaded."""
        return cls(str(model_id), hashlib.sha256(data).hexdigest(), created_at(created, mtime))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def to_columns(self) -> dict[str, str]:
        """As table columns: model_id, model_sha256, model_created."""
        return {f"model_{key}": value for key, value in self.to_dict().items()}

    @classmethod
    def from_dict(cls, body: Mapping[str, Any] | None) -> ModelVersion | None:
        """Parse an answer's `model` object; None when the answer carries none."""
        if not body:
            return None
        return cls(str(body["id"]), str(body["sha256"]), str(body["created"]))


def created_at(recorded: Any, mtime: float | None) -> str:
    """A checkpoint's creation time: the one it records, else its file's mtime (POSIX
    seconds), else now (bytes without a file); ISO 8601, UTC."""
    if recorded:
        return str(recorded)
    when = dt.datetime.now(dt.UTC) if mtime is None else dt.datetime.fromtimestamp(mtime, dt.UTC)
    return when.isoformat(timespec="seconds")


RISK_FIELDS = ("risk", "traffic_light", "malignant", "benign")
GATE_FIELDS = ("accepted", "reasons", "ood_score", "ood_threshold")


def accept_all() -> dict[str, Any]:
    """The gate of an answer without one (a server or table from before the gate)."""
    return {"accepted": True, "reasons": [], "ood_score": None, "ood_threshold": None}


@dataclass(frozen=True)
class Answer:
    """One image's answer: calibrated probabilities (CLASS_NAMES order), the top class, the
    risk fields, the gate's verdict, the conformal prediction set and the model version.

    An image the gate refuses keeps its probabilities (`probabilities_trusted` false) but
    claims no risk: traffic light "unknown", risk and bars None (`without_risk`).
    """

    probabilities: dict[str, float]
    top_class: str
    top_probability: float
    risk: float | None
    traffic_light: str
    malignant: float | None
    benign: float | None
    gate: dict[str, Any] = field(default_factory=accept_all)  # GATE_FIELDS (+ "checks")
    prediction_set: tuple[str, ...] | None = None
    set_coverage: float | None = None
    model: ModelVersion | None = None

    @property
    def accepted(self) -> bool:
        return bool(self.gate.get("accepted", True))

    def without_risk(self) -> Answer:
        """The answer the gate gives for a refused image: no risk level, bars or light."""
        return replace(self, **(dict.fromkeys(RISK_FIELDS) | {"traffic_light": "unknown"}))

    def to_dict(self) -> dict[str, Any]:
        """The JSON of one `/v1/classify` result (without the request's own fields)."""
        return {
            "probabilities": dict(self.probabilities),
            "probabilities_trusted": self.accepted,
            "top_class": self.top_class,
            "top_probability": self.top_probability,
            **{key: getattr(self, key) for key in RISK_FIELDS},
            "gate": dict(self.gate),
            "prediction_set": None if self.prediction_set is None else list(self.prediction_set),
            "set_coverage": self.set_coverage,
            "model": self.model.to_dict() if self.model else None,
        }

    @classmethod
    def from_dict(cls, body: Mapping[str, Any], **extra: Any) -> Any:
        """Parse `to_dict`'s JSON (`extra`: a subclass's own fields); an answer without a gate
        was accepted, null or non-finite numbers become None, a missing light is "unknown"."""
        gate = accept_all() | dict(body.get("gate") or {})
        gate["reasons"] = [str(reason) for reason in gate.get("reasons") or ()]
        for key in ("ood_score", "ood_threshold"):
            gate[key] = finite_number(gate.get(key))
        members = body.get("prediction_set")
        return cls(
            probabilities={name: float(body["probabilities"][name]) for name in CLASS_NAMES},
            top_class=str(body["top_class"]),
            top_probability=float(body["top_probability"]),
            risk=finite_number(body.get("risk")),
            traffic_light=str(body.get("traffic_light") or "unknown"),
            malignant=finite_number(body.get("malignant")),
            benign=finite_number(body.get("benign")),
            gate=gate,
            prediction_set=None if members is None else tuple(str(m) for m in members),
            set_coverage=finite_number(body.get("set_coverage")),
            model=ModelVersion.from_dict(body.get("model")),
            **extra,
        )

    def to_row(self) -> dict[str, Any]:
        """The answer as batch inference's flat columns (`ROW_COLUMNS`, in that order)."""
        row: dict[str, Any] = self.model.to_columns() if self.model else {}
        row |= {f"prob_{name}": self.probabilities[name] for name in CLASS_NAMES}
        answer = self.to_dict()
        row |= {key: answer[key] for key in ANSWER_COLUMNS}
        row |= {f"gate_{key}": self.gate.get(key) for key in (*GATE_FIELDS, "checks")}
        row["gate_reasons"] = list(self.gate.get("reasons") or ())
        return row


def finite_number(value: Any) -> float | None:
    """A float, or None for null (a refused image's risk) and anything not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


ANSWER_COLUMNS = ("probabilities_trusted", "top_class", "top_probability", *RISK_FIELDS,
                  "prediction_set", "set_coverage")  # fmt: skip
# Batch inference's columns of an answer, with their kinds (string, float, bool, strings).
ROW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("model_id", "string"),
    ("model_sha256", "string"),
    ("model_created", "string"),
    *((f"prob_{name}", "float") for name in CLASS_NAMES),
    ("probabilities_trusted", "bool"),
    ("top_class", "string"),
    ("top_probability", "float"),
    ("risk", "float"),
    ("traffic_light", "string"),
    ("malignant", "float"),
    ("benign", "float"),
    ("gate_accepted", "bool"),
    ("gate_reasons", "strings"),
    ("gate_ood_score", "float"),
    ("gate_ood_threshold", "float"),
    ("gate_checks", "string"),
    ("prediction_set", "strings"),
    ("set_coverage", "float"),
)
