"""The one answer schema (dermanet/answer.py): JSON, batch columns and the dashboard's parse."""

from __future__ import annotations

import subprocess
import sys

from dermanet.answer import ROW_COLUMNS, Answer, ModelVersion
from dermanet.classes import CLASS_NAMES

VERSION = ModelVersion("default", "ab" * 32, "2026-12-01T10:00:00+00:00")


def answer(accepted: bool = True) -> Answer:
    probabilities = dict.fromkeys(CLASS_NAMES, 0.02) | {"MEL": 0.86}
    gate = {"accepted": accepted, "reasons": [] if accepted else ["blurred"],
            "ood_score": 0.8, "ood_threshold": 1.5}  # fmt: skip
    result = Answer(probabilities, "MEL", 0.86, 1.29, "red", 1.0, 0.0, gate, ("MEL",), 0.9, VERSION)
    return result if accepted else result.without_risk()


def test_json_round_trip_and_a_refused_image_claims_no_risk() -> None:
    for accepted in (True, False):
        body = answer(accepted).to_dict()
        assert Answer.from_dict(body) == answer(accepted)
        assert body["model"] == VERSION.to_dict() and body["probabilities_trusted"] is accepted
    refused = answer(False).to_dict()
    assert refused["traffic_light"] == "unknown" and refused["risk"] is None
    old = Answer.from_dict({k: v for k, v in answer().to_dict().items() if k != "gate"})
    assert old.accepted and old.model == VERSION  # an answer without a gate was accepted


def test_rows_have_exactly_the_declared_columns() -> None:
    row = answer(False).to_row()
    assert set(row) == {name for name, _ in ROW_COLUMNS}
    assert row["model_sha256"] == VERSION.sha256 and row["gate_reasons"] == ["blurred"]
    assert row["prob_MEL"] == 0.86 and row["risk"] is None and row["gate_accepted"] is False


def test_the_dashboard_side_does_not_import_torch() -> None:
    code = "import sys, dermanet.answer, dermanet.ui.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
