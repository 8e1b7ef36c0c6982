"""Figures people would rather look at than tables: confusion matrix, ROC curves, curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from dermanet.classes import CLASS_NAMES
from dermanet.eval.metrics import auroc

if TYPE_CHECKING:
    from dermanet.eval.compare import Difference


def confusion_matrix_figure(
    matrix: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES, title: str = ""
) -> Figure:
    """Row-normalised confusion matrix (recall on the diagonal) with raw counts in each cell."""
    support = matrix.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(support > 0, matrix / support, 0.0)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, f"{normalised[i, j]:.2f}\n({matrix[i, j]})", ha="center", va="center",
                    fontsize=7, color=colour)  # fmt: skip
    fig.colorbar(im, ax=ax, label="share of true class")
    ax.set_title(title or "Confusion matrix (rows: recall)")
    fig.tight_layout()
    return fig


def roc_figure(
    probs: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES
) -> Figure:
    """One-vs-rest ROC curve per class, AUC in the legend."""
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for k, name in enumerate(class_names):
        positives = labels == k
        if not 0 < positives.sum() < len(labels):
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auroc(probs[:, k], positives):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    return _finished(fig, ax, "1 - specificity", "sensitivity", "ROC curves (one vs rest)",
                     "lower right")  # fmt: skip


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], bins: int = 15) -> Figure:
    """Reliability diagram: accuracy against confidence per bin, one line per variant.

    `curves` maps a label (e.g. "raw, ECE 0.13") to (probabilities (N, K), labels (N,)).
    """
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for label, (probs, labels) in curves.items():
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == labels
        which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            members = which == b
            if members.sum() >= 5:  # bins with a handful of images say nothing
                xs.append(confidence[members].mean())
                ys.append(correct[members].mean())
        ax.plot(xs, ys, marker="o", label=label)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    return _finished(fig, ax, "confidence (top-class probability)", "accuracy",
                     "Reliability of the served probabilities", "upper left")  # fmt: skip


def _finished(fig: Figure, ax, xlabel: str, ylabel: str, title: str, legend: str) -> Figure:
    """Labels, title and a small legend on the axes of a one-panel curve figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend, fontsize=8)
    fig.tight_layout()
    return fig


def training_curves_figure(metrics: pd.DataFrame, columns: list[str]) -> Figure:
    """Each named metric against epoch (rows with NaN in a column are skipped)."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.5 * len(columns), 3.5), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        if column in metrics:
            rows = metrics[["epoch", column]].dropna()
            ax.plot(rows["epoch"], rows[column], marker="o")
        ax.set_title(column)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    return fig


def differences_figure(differences: Sequence[Difference], title: str = "") -> Figure:
    """Forest plot of `jobs/compare.py`'s differences: one panel per metric, one row per
    group of images, the point at candidate - baseline and the bar its bootstrap interval;
    green where the candidate is better, red where the baseline is, grey within noise."""
    metrics = list(dict.fromkeys(d.metric for d in differences))
    groups = list(dict.fromkeys(d.group for d in differences))
    colours = {"candidate better": "tab:green", "baseline better": "tab:red"}
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(3 + 4 * len(metrics), 0.6 * len(groups) + 1.6),
        squeeze=False, sharey=True,
    )  # fmt: skip
    for ax, metric in zip(axes[0], metrics, strict=True):
        for d in (d for d in differences if d.metric == metric):
            y = len(groups) - 1 - groups.index(d.group)
            colour = colours.get(d.verdict, "grey")
            ax.plot([d.low, d.high], [y, y], color=colour, linewidth=2)
            ax.plot(d.difference, y, "o", color=colour)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{metric}\ncandidate - baseline")
        ax.grid(axis="x", alpha=0.3)
    sizes = {d.group: d.images for d in differences}
    axes[0][0].set_yticks(range(len(groups)), [f"{g} (n={sizes[g]})" for g in reversed(groups)])
    fig.suptitle(title or "Paired bootstrap: differences and their intervals")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
