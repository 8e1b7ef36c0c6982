"""The drift report as Markdown with matplotlib PNGs beside it (jobs/monitor.py writes it)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from dermanet.classes import CLASS_NAMES
from dermanet.eval.plots import plt, save_figure
from dermanet.monitoring.drift import DriftReport, ModelDrift

ALPHA = 0.01  # p-value below which a difference is called drift (many models, many looks)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:24] or "model"


def _p(value: float | None) -> str:
    if value is None:
        return "not tested"
    verdict = "**drift**" if value < ALPHA else "no evidence of drift"
    return f"p = {value:.2g} ({verdict})"


def _plots(report: DriftReport, drift: ModelDrift, folder: Path) -> list[str]:
    """The model's PNGs (file names): refusals over time, OOD scores, class mix."""
    slug = _slug(drift.model)
    names = []
    shares = drift.over_time.drop(columns="answers")
    if not shares.empty and len(shares.columns):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        shares.plot.bar(stacked=True, ax=ax, width=0.8)
        ax.set(ylabel="share of answers refused", xlabel="", title=f"Refusals by reason: {slug}")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        names.append(save_figure(fig, folder / f"refusals_{slug}.png").name)
    if drift.ood_scores:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        bins = 40
        if len(report.reference_ood):
            ax.hist(report.reference_ood, bins, density=True, alpha=0.5, label="reference")
        ax.hist(drift.ood_values, bins, density=True, alpha=0.5, label="answers")
        ax.set(xlabel="OOD score", ylabel="density", title=f"OOD scores: {slug}")
        ax.legend()
        fig.tight_layout()
        names.append(save_figure(fig, folder / f"ood_{slug}.png").name)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(CLASS_NAMES))
    ax.bar(x - 0.2, [drift.class_mix[c] for c in CLASS_NAMES], 0.4, label="accepted answers")
    if report.prior:
        ax.bar(x + 0.2, [report.prior[c] for c in CLASS_NAMES], 0.4, label="training prior")
    ax.set_xticks(x, CLASS_NAMES)
    ax.set(ylabel="share", title=f"Predicted class mix: {slug}")
    ax.legend()
    fig.tight_layout()
    names.append(save_figure(fig, folder / f"classes_{slug}.png").name)
    return names


def write_report(report: DriftReport, folder: str | Path, source: str) -> Path:
    """report.md and its PNGs in `folder`; returns the Markdown file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    window = f"since {report.since:%Y-%m-%d %H:%M} UTC" if report.since else "all rows"
    lines = [
        "# DermaNet drift report",
        "",
        f"Answers: `{source}` ({window}); reference: {report.reference_answers} rows "
        f"({len(report.reference_ood)} OOD scores, "
        f"{'a label prior' if report.prior else 'no label prior'}). "
        f"Drift is called at p < {ALPHA}.",
        "",
    ]
    lines += [f"- {note}" for note in report.notes]
    if not report.models:
        lines += ["", "**No answers in the window: nothing to report.**"]
    for drift in report.models:
        lines += [
            "",
            f"## Model `{drift.model}`",
            "",
            f"{drift.answers} answers, {drift.refused} refused by the gate "
            f"({drift.refusal_rate:.1%}).",
            "",
        ]
        lines += [f"- {note}" for note in drift.notes]
        lines += ["", "| refusal reason | images | share of answers |", "|---|---|---|"]
        for kind, count in sorted(drift.refusals_by_kind.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {kind} | {count} | {count / drift.answers:.1%} |")
        lines += ["", "Refusal share over time:", "", _table(drift.over_time), ""]
        lines += [
            f"- OOD scores: {drift.ood_scores} against {len(report.reference_ood)} reference; "
            + (
                f"KS statistic {drift.ood_ks:.3f}, {_p(drift.ood_p)}"
                if drift.ood_ks is not None
                else "not tested"
            ),
            "- Class mix of accepted answers against the training prior: "
            + (
                f"total variation {drift.tv_distance:.3f}, chi-square {_p(drift.chi2_p)}"
                if drift.tv_distance is not None
                else "not tested"
            ),
            "",
        ]
        lines += [f"![{name}]({name})" for name in _plots(report, drift, folder)]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _table(frame: pd.DataFrame) -> str:
    header = "| period | " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|---" * (len(frame.columns) + 1) + "|"
    rows = [
        f"| {index} | "
        + " | ".join(f"{v:.0f}" if c == "answers" else f"{v:.1%}" for c, v in row.items())
        + " |"
        for index, row in frame.iterrows()
    ]
    return "\n".join([header, rule, *rows])
