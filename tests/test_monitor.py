"""jobs/monitor.py's drift report on batch-inference tables in jobs/predict.py's real schema
(`output_schema`), with gate reasons as the gate words them: one model version like the
reference, one drifted (OOD scores shifted, every accepted answer MEL), and too little data."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_job

from dermanet.classes import CLASS_NAMES
from dermanet.inference.batch import output_schema
from dermanet.trust.evaluation import gate_decision
from dermanet.trust.quality import QualityReport

NOW = datetime.now(UTC)
THRESHOLD = 2.0
PRIOR = np.array([0.05, 0.08, 0.1, 0.02, 0.15, 0.55, 0.03, 0.02])
BLANK = "nearly uniform or blank: grey-level spread 1.0, at least 4 expected"


def rows(n: int, model: str, shift: float, classes: np.ndarray, seed: int, days: float) -> list:
    """n answers spread over the last `days` days; one in ten blank, OOD scores N(shift, 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        blank = i % 10 == 0
        score = None if blank else float(rng.normal(shift, 1.0))
        quality = QualityReport(ok=not blank, reasons=[BLANK] if blank else [])
        gate = gate_decision(quality, score, None if blank else THRESHOLD)
        label = CLASS_NAMES[rng.choice(len(CLASS_NAMES), p=classes)]
        probs = {f"prob_{c}": float(c == label) for c in CLASS_NAMES}
        out.append(
            probs
            | {
                "image": f"img{i}",
                "time": (NOW - timedelta(days=days * rng.random())).isoformat(),
                "label": label,
                "model_id": model,
                "probabilities_trusted": gate["accepted"],
                "top_class": label,
                "top_probability": 1.0,
                "gate_accepted": gate["accepted"],
                "gate_reasons": gate["reasons"],
                "gate_ood_score": gate["ood_score"],
                "gate_ood_threshold": gate["ood_threshold"],
            }
        )
    return out


def write(path: Path, table_rows: list) -> Path:
    schema = output_schema(["image", "time", "label"], None)
    pq.write_table(pa.Table.from_pylist(table_rows, schema=schema), path)
    return path


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("monitor")
    mel = np.eye(len(CLASS_NAMES))[CLASS_NAMES.index("MEL")]
    answers = rows(400, "default", 0.0, PRIOR, 1, 14) + rows(200, "candidate", 1.5, mel, 2, 5)
    return {
        "reference": write(folder / "val.parquet", rows(600, "default", 0.0, PRIOR, 3, 0)),
        "answers": write(folder / "answers.parquet", answers),
        "few": write(folder / "few.parquet", rows(12, "default", 0.0, PRIOR, 4, 1)),
    }


def section(report: str, model: str) -> str:
    return report.split(f"## Model `{model}`")[1].split("## Model")[0]


def test_drift_found_only_in_the_drifted_model(tables, tmp_path: Path, capsys):
    out = tmp_path / "report"
    argv = ["--answers", str(tables["answers"]), "--reference", str(tables["reference"])]
    assert load_job("monitor").main([*argv, "--since", "7d", "--output", str(out)]) == 0
    report = (out / "report.md").read_text()
    same, drifted = section(report, "default"), section(report, "candidate")
    assert "**drift**" not in same, same
    assert drifted.count("**drift**") == 2, drifted  # OOD scores and class mix
    # --since 7d keeps about half of the 400 answers spread over 14 days, all 200 of 5 days
    kept = int(same.split(" answers,")[0].strip())
    assert 150 < kept < 250
    assert drifted.startswith("\n\n200 answers")
    assert "| blank |" in same and "| ood |" in drifted  # refusals by kind
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 6 and all(f"]({name})" in report for name in pngs)
    assert "2 model version(s)" in capsys.readouterr().out


def test_too_little_data_is_said(tables, tmp_path: Path, capsys):
    out = tmp_path / "few"
    code = load_job("monitor").main(["--answers", str(tables["few"]), "--output", str(out)])
    assert code == 0
    report = (out / "report.md").read_text()
    assert "too little data: 12 answers" in report
    assert "no reference table" in report
    assert "too little data" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--since", "a week"], "use a number and a unit"),
        (["--answers", "/nonexistent.parquet"], "no answers table"),
    ],
)
def test_bad_input_is_one_line(tables, tmp_path: Path, capsys, argv, message):
    base = ["--answers", str(tables["few"]), "--output", str(tmp_path / "x")]
    assert load_job("monitor").main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_answers_stored_with_cases(tables, tmp_path: Path):
    """The case database's `answers` table (rows as the case routes store them: the classify
    answer as JSON, model id and file SHA-256, time): grouped by the file's SHA-256."""
    sqlalchemy = pytest.importorskip("sqlalchemy", reason="the case database needs SQLAlchemy")
    url = f"sqlite:///{tmp_path / 'cases.db'}"
    engine = sqlalchemy.create_engine(url)
    stored = rows(40, "default", 0.0, PRIOR, 5, 3)
    with engine.begin() as db:
        db.execute(sqlalchemy.text(
            "CREATE TABLE answers (id INTEGER PRIMARY KEY, image_id INTEGER, model_id VARCHAR,"
            " model_sha256 VARCHAR, answer JSON, gate_accepted BOOLEAN, created_at DATETIME)"
        ))  # fmt: skip
        for i, row in enumerate(stored):
            gate = {k.removeprefix("gate_"): row[k] for k in row if k.startswith("gate_")}
            answer = {"top_class": row["top_class"], "gate": gate, "model_id": "default"}
            db.execute(
                sqlalchemy.text(
                    "INSERT INTO answers (image_id, model_id, model_sha256, answer, "
                    "gate_accepted, created_at) VALUES (:i, 'default', :sha, :answer, :ok, :at)"
                ),
                {"i": i, "sha": "ab" * 32, "answer": json.dumps(answer),
                 "ok": gate["accepted"], "at": row["time"].replace("T", " ")[:26]},
            )  # fmt: skip
    out = tmp_path / "cases-report"
    argv = ["--database", url, "--reference", str(tables["reference"]), "--output", str(out)]
    assert load_job("monitor").main(argv) == 0
    report = (out / "report.md").read_text()
    assert f"## Model `{'ab' * 32}`" in report and "\n\n40 answers, 4 refused" in report
    assert "| blank | 4 |" in report and "carry no time" not in report
