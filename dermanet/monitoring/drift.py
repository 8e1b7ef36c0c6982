"""Drift report of stored answers: are the images and the answers still like validation's?

Answers come from a batch-inference table (jobs/predict.py's output, one row per image) or the
case database's stored answers (`read_case_answers`); each row is one classified image. Per
model version (the file's SHA-256 when rows carry it, else the registry id) the report gives:

- the gate's refusal rate over time by reason kind (a quality check's name or "ood");
- the OOD score distribution against a reference's (validation's, scored the same way:
  jobs/predict.py on the val images), two-sample Kolmogorov-Smirnov test;
- the predicted class mix of accepted answers against the training prior (the reference's
  `label` column: splits are label-stratified, so validation's label mix is the training
  prior), chi-square goodness of fit and total variation distance.

Checkpoints keep the OOD threshold and its validation refusal rate, not validation's scores,
hence the reference table. Below `min_answers` rows the tests are not run and the report says
so. Timestamps (`time` and the like) are optional: batch tables have none, so the window and
the over-time table then cover every row, and the report says that too.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from dermanet.classes import CLASS_NAMES
from dermanet.monitoring.reasons import reason_kinds

TIME_COLUMNS = ("time", "created_at", "scored_at", "taken_at", "uploaded_at")
MODEL_COLUMNS = ("model_sha256", "model_id")  # the most exact version first
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$")
UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MIN_ANSWERS = 30  # below it a distribution test says little: the report says so instead


def parse_since(text: str) -> timedelta:
    """'7d', '12h', '30m', '2w' → a timedelta; anything else is a ValueError saying the form."""
    match = DURATION.match(str(text))
    if not match:
        raise ValueError(f"--since {text!r}: use a number and a unit, e.g. 30m, 12h, 7d or 2w")
    return timedelta(**{UNITS[match.group(2)]: float(match.group(1))})


def _reasons(value: Any) -> list[str]:
    """gate_reasons as stored: a list (Parquet), JSON text (CSV) or nothing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [value]
    return [str(item) for item in value]


def read_answers(location: str | Path) -> pd.DataFrame:
    """A batch-inference table (Parquet or CSV) as answers: one row per scored image with
    `time` (UTC or NaT), `model`, `accepted`, `kind` (first refusal reason's kind, or None),
    `ood_score` and `top_class`. Unreadable images (`error` set) are left out."""
    path = Path(location)
    if not path.exists():
        raise FileNotFoundError(f"no answers table at {path}")
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    missing = {"gate_accepted", "gate_reasons", "gate_ood_score", "top_class"} - set(table)
    model_columns = [c for c in MODEL_COLUMNS if c in table]
    if missing or not model_columns:
        need = sorted(missing | (set() if model_columns else {"model_id"}))
        raise ValueError(f"{path} is not a jobs/predict.py output table: no column {need}")
    if "error" in table:
        table = table[table["error"].isna()]
    time_column = next((c for c in TIME_COLUMNS if c in table), None)
    times = table[time_column] if time_column else pd.Series(pd.NaT, index=table.index)
    accepted = table["gate_accepted"].astype(str).str.lower().isin(["true", "1"])
    return _answers(
        times.to_numpy(),
        _versions(table[model_columns]),
        accepted.to_numpy(),
        [_reasons(r) for r in table["gate_reasons"]],
        pd.to_numeric(table["gate_ood_score"], errors="coerce").to_numpy(),
        table["top_class"].astype(str).to_numpy(),
        table["label"].astype(str).to_numpy() if "label" in table else None,
    )


def _versions(columns: pd.DataFrame) -> list[str]:
    """Each row's model version: the first of MODEL_COLUMNS it has a value in (a table may
    carry the SHA-256 column with rows that lack it)."""
    return [
        next((str(v) for v in row if isinstance(v, str) and v), "unknown")
        for row in columns.itertuples(index=False)
    ]


def _answers(times, models, accepted, reasons, ood, top_class, labels) -> pd.DataFrame:
    """The answers frame every reader returns (`kind`: the first refusal reason's kind)."""
    kinds = [
        None if ok else (reason_kinds(r) or ["other"])[0]
        for ok, r in zip(accepted, reasons, strict=True)
    ]
    return pd.DataFrame(
        {
            "time": pd.to_datetime(pd.Series(times), utc=True, errors="coerce").to_numpy(),
            "model": models,
            "accepted": np.asarray(accepted, dtype=bool),
            "kind": kinds,
            "ood_score": pd.to_numeric(pd.Series(ood, dtype=object), errors="coerce").to_numpy(),
            "top_class": top_class,
            "label": labels,
        }
    )


def read_case_answers(url: str) -> pd.DataFrame:
    """The answers stored with cases (the `answers` table of the case database at SQLAlchemy
    `url`: each row the classify answer as served, its model id and file SHA-256, its time)."""
    import sqlalchemy

    query = "SELECT model_id, model_sha256, answer, created_at FROM answers"
    with sqlalchemy.create_engine(url).connect() as connection:
        rows = connection.execute(sqlalchemy.text(query)).mappings().all()
    answers = [
        r["answer"] if isinstance(r["answer"], dict) else json.loads(r["answer"]) for r in rows
    ]
    gates = [a.get("gate") or {} for a in answers]
    return _answers(
        [r["created_at"] for r in rows],
        [r["model_sha256"] or r["model_id"] for r in rows],
        [bool(g.get("accepted", True)) for g in gates],
        [g.get("reasons") or [] for g in gates],
        [g.get("ood_score") for g in gates],
        [str(a.get("top_class")) for a in answers],
        None,
    )


@dataclass
class ModelDrift:
    """The drift numbers of one model version."""

    model: str
    answers: int
    refused: int
    refusals_by_kind: dict[str, int]
    over_time: pd.DataFrame  # rows: period; columns: answers, refusal share per kind
    ood_scores: int = 0
    ood_values: np.ndarray = field(default_factory=lambda: np.array([]), repr=False)
    ood_ks: float | None = None  # KS statistic against the reference, p-value below
    ood_p: float | None = None
    class_mix: dict[str, float] = field(default_factory=dict)  # accepted answers' shares
    chi2_p: float | None = None
    tv_distance: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def refusal_rate(self) -> float:
        return self.refused / self.answers if self.answers else float("nan")


@dataclass
class DriftReport:
    since: datetime | None
    timed: bool
    models: list[ModelDrift]
    reference_answers: int
    prior: dict[str, float]
    reference_ood: np.ndarray
    notes: list[str] = field(default_factory=list)


def class_prior(reference: pd.DataFrame | None) -> dict[str, float]:
    """The reference's label shares (CLASS_NAMES order), or {} when it has no labels."""
    if reference is None or reference["label"].isna().all():
        return {}
    labels = reference["label"][reference["label"].isin(CLASS_NAMES)]
    counts = labels.value_counts()
    return {c: float(counts.get(c, 0)) / max(len(labels), 1) for c in CLASS_NAMES}


def _period(times: pd.Series) -> str:
    span = times.max() - times.min()
    return "D" if span > pd.Timedelta(days=2) else "h"


def over_time(rows: pd.DataFrame) -> pd.DataFrame:
    """Answers and refusal share per kind per day (per hour within two days)."""
    if rows["time"].isna().all():
        periods = pd.Series("all rows", index=rows.index)
    else:
        periods = rows["time"].dt.tz_localize(None).dt.to_period(_period(rows["time"])).astype(str)
    kinds = pd.crosstab(periods, rows["kind"].fillna("accepted"))
    answers = kinds.sum(axis=1)
    shares = kinds.drop(columns="accepted", errors="ignore").div(answers, axis=0)
    return pd.concat([answers.rename("answers"), shares], axis=1).sort_index()


def model_drift(
    rows: pd.DataFrame, reference_ood: np.ndarray, prior: dict[str, float], min_answers: int
) -> ModelDrift:
    refused = rows[~rows["accepted"]]
    drift = ModelDrift(
        model=str(rows["model"].iloc[0]),
        answers=len(rows),
        refused=len(refused),
        refusals_by_kind={k: int(n) for k, n in refused["kind"].value_counts().items()},
        over_time=over_time(rows),
    )
    scores = rows["ood_score"].to_numpy(dtype=float)
    scores = scores[np.isfinite(scores)]
    drift.ood_scores, drift.ood_values = len(scores), scores
    accepted = rows.loc[rows["accepted"], "top_class"]
    counts = accepted.value_counts()
    drift.class_mix = {c: float(counts.get(c, 0)) / max(len(accepted), 1) for c in CLASS_NAMES}
    if len(rows) < min_answers:
        drift.notes.append(
            f"too little data: {len(rows)} answers (at least {min_answers} needed for the "
            "distribution tests); counts only"
        )
        return drift
    if len(reference_ood) and len(scores) >= min_answers:
        result = stats.ks_2samp(scores, reference_ood)
        drift.ood_ks, drift.ood_p = float(result.statistic), float(result.pvalue)
    elif len(reference_ood):
        drift.notes.append(f"only {len(scores)} OOD scores (the model has no OOD statistics?)")
    if prior and len(accepted) >= min_answers:
        observed = np.array([counts.get(c, 0) for c in CLASS_NAMES], dtype=float)
        expected = np.array([prior[c] for c in CLASS_NAMES]) * observed.sum()
        seen = expected > 0
        if (observed[~seen] > 0).any():
            drift.notes.append("answers of a class the prior never has: chi-square left out")
        else:
            drift.chi2_p = float(stats.chisquare(observed[seen], expected[seen]).pvalue)
        drift.tv_distance = 0.5 * sum(abs(drift.class_mix[c] - prior[c]) for c in CLASS_NAMES)
    elif prior:
        drift.notes.append(f"only {len(accepted)} accepted answers: class mix not tested")
    return drift


def drift_report(
    answers: pd.DataFrame,
    reference: pd.DataFrame | None = None,
    since: timedelta | None = None,
    now: datetime | None = None,
    min_answers: int = MIN_ANSWERS,
) -> DriftReport:
    """The report's numbers: answers in the window, per model version, against the reference."""
    notes = []
    timed = not answers["time"].isna().all()
    start = None
    if since is not None and timed:
        start = (now or datetime.now(UTC)) - since
        answers = answers[answers["time"] >= pd.Timestamp(start)]
    elif since is not None:
        notes.append("the answers carry no time: every row is used, whatever --since says")
    reference_ood = np.array([], dtype=float)
    prior: dict[str, float] = {}
    if reference is None:
        notes.append(
            "no reference table: OOD scores and class mix are not compared (pass jobs/predict.py"
            "'s output on the validation images, with their labels)"
        )
    else:
        ood = reference["ood_score"].to_numpy(dtype=float)
        reference_ood = ood[np.isfinite(ood)]
        prior = class_prior(reference)
        if not prior:
            notes.append("the reference has no `label` column: class mix not compared")
    models = [
        model_drift(rows, reference_ood, prior, min_answers)
        for _, rows in answers.groupby("model", sort=True)
    ]
    return DriftReport(
        since=start,
        timed=timed,
        models=models,
        reference_answers=0 if reference is None else len(reference),
        prior=prior,
        reference_ood=reference_ood,
        notes=notes,
    )
