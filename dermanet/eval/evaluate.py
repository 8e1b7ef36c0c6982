"""jobs/evaluate.py's logic: predict a split, score it officially, calibrate, plot, report.

Outputs in the chosen folder: predictions.csv (ISIC submission format), truth.csv, report.json,
report.md, roc_curves.png, confusion_matrix.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import SPLITS
from dermanet.data.pipelines import (
    NormalizedBatches,
    PipelineConfig,
    build_pipeline,
    read_catalogue_files,
    read_shards,
)
from dermanet.data.readers import read_catalogue
from dermanet.data.shards import shard_dir
from dermanet.data.splits import assign_splits
from dermanet.eval.calibration import expected_calibration_error, fit_temperature
from dermanet.eval.isic_scorer import isic_submission, official_score
from dermanet.eval.metrics import classification_metrics, confusion_matrix, softmax
from dermanet.eval.plots import confusion_matrix_figure, roc_figure, save_figure
from dermanet.inference.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateSettings:
    checkpoint: str
    output: str
    shards: str | None = None
    csv: str | None = None
    images: str | None = None
    split: str = "test"
    split_seed: int = 0
    tta: bool = False
    calibrate: bool = True
    batch_size: int = 64
    export: str | None = None  # write the calibrated checkpoint + these metrics here
    half: bool = False  # export in float16


def predict_logits(
    loaded: LoadedCheckpoint, batches: NormalizedBatches, tta: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and row indices over a batch stream; TTA averages logits over the 4 flips."""
    model = loaded.model.eval()
    logits, indices = [], []
    with torch.inference_mode():
        for batch in batches:
            images = batch["image"]
            views = [images]
            if tta:
                views += [images.flip(3), images.flip(2), images.flip(2, 3)]
            out = torch.stack([model(v).logits.float() for v in views]).mean(0)
            logits.append(out.numpy())
            indices.append(batch["index"].numpy())
    return np.concatenate(logits), np.concatenate(indices)


def _split_source(settings: EvaluateSettings, split: str, config: PipelineConfig):
    """(batches, index -> (image id, label index) table) for one split."""
    if settings.shards:
        source = read_shards(settings.shards, split)
        table = pq.read_table(shard_dir(settings.shards, split), columns=["image", "index",
                              "label_index"]).to_pandas()  # fmt: skip
    else:
        catalogue = read_catalogue(settings.csv, settings.images)
        if not catalogue["split"].isin(SPLITS).all():
            catalogue = assign_splits(catalogue, seed=settings.split_seed)
        source = read_catalogue_files(catalogue, split=split)
        table = catalogue.assign(index=np.arange(len(catalogue)))
        table["label_index"] = table["label"].map(CLASS_NAMES.index)
        table = table.loc[table["split"] == split, ["image", "index", "label_index"]]
    ds = build_pipeline(source, "eval", config)
    batches = NormalizedBatches(ds.iter_torch_batches(batch_size=settings.batch_size))
    return batches, table.set_index("index")


def sensitivity_at_specificity(truth: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """Highest sensitivity whose specificity is at least `specificity` (ROC read-off)."""
    fpr, tpr, _ = roc_curve(truth, scores)
    allowed = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def run_evaluation(settings: EvaluateSettings) -> dict[str, Any]:
    loaded = load_checkpoint(settings.checkpoint)
    config = PipelineConfig(img_size=loaded.img_size, mean=loaded.mean, std=loaded.std)
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)

    batches, table = _split_source(settings, settings.split, config)
    logits, index = predict_logits(loaded, batches, settings.tta)
    rows = table.loc[index]
    labels = rows["label_index"].to_numpy()
    temperature = 1.0
    if settings.calibrate and settings.split != "val":
        val_batches, val_table = _split_source(settings, "val", config)
        val_logits, val_index = predict_logits(loaded, val_batches, settings.tta)
        val_labels = val_table.loc[val_index, "label_index"].to_numpy()
        temperature = fit_temperature(val_logits, val_labels)
    raw_probs = softmax(logits)
    probs = softmax(logits, temperature)

    image_ids = rows["image"].astype(str).tolist()
    isic_submission(image_ids, probs).to_csv(out / "predictions.csv", index=False)
    isic_submission(image_ids, np.eye(len(CLASS_NAMES))[labels]).to_csv(
        out / "truth.csv", index=False
    )
    score = official_score(image_ids, labels, probs)
    ours = classification_metrics(probs, labels)
    mel = CLASS_NAMES.index("MEL")
    is_mel = labels == mel
    has_mel = 0 < is_mel.sum() < len(labels)
    report: dict[str, Any] = {
        "checkpoint": str(settings.checkpoint),
        "settings": dataclasses.asdict(settings),
        "images": len(labels),
        "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_NAMES)},
        "temperature": temperature,
        "ece_before": expected_calibration_error(raw_probs, labels),
        "ece_after": expected_calibration_error(probs, labels),
        "official": {
            "balanced_accuracy": float(score.overall),
            "per_category": score.per_category.to_dict(),
            "macro_average": score.macro_average.to_dict(),
        },
        "metrics": ours,
        "melanoma": {
            "auc": float(roc_auc_score(is_mel, probs[:, mel])) if has_mel else float("nan"),
            "sensitivity_at_80_specificity": (
                sensitivity_at_specificity(is_mel, probs[:, mel], 0.8) if has_mel else float("nan")
            ),
        },
    }
    matrix = confusion_matrix(labels, probs.argmax(axis=1), len(CLASS_NAMES))
    report["confusion_matrix"] = matrix.tolist()
    save_figure(confusion_matrix_figure(matrix, title=f"{settings.split} split"),
                out / "confusion_matrix.png")  # fmt: skip
    save_figure(roc_figure(probs, labels), out / "roc_curves.png")
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(render_markdown(report))
    log.info("balanced accuracy %.4f on %d images", score.overall, len(labels))
    if settings.export:
        export_checkpoint(loaded, report, settings)
    return report


def export_checkpoint(
    loaded: LoadedCheckpoint, report: dict[str, Any], settings: EvaluateSettings
) -> Path:
    """Ship a model: the evaluated weights, the fitted temperature and the scores, one file.

    Serving applies the temperature, and `/v1/models` shows the metrics, so what a clinician
    sees is what was measured here.
    """
    split = settings.split
    metrics = {
        **loaded.metrics,
        f"{split}_balanced_accuracy": report["official"]["balanced_accuracy"],
        f"{split}_macro_auroc": report["metrics"]["macro_auroc"],
        f"{split}_top1": report["metrics"]["top1"],
        f"{split}_macro_f1": report["metrics"]["macro_f1"],
        f"{split}_melanoma_auc": report["melanoma"]["auc"],
        f"{split}_melanoma_sens_at_80_spec": report["melanoma"]["sensitivity_at_80_specificity"],
        f"{split}_ece_before": report["ece_before"],
        f"{split}_ece_after": report["ece_after"],
        f"{split}_tta": settings.tta,
    }  # the temperature travels once, as the checkpoint's calibration
    provenance = {
        **loaded.provenance,
        "exported_from": str(settings.checkpoint),
        "evaluated_on": f"{split} split of {settings.shards or settings.csv}",
    }
    path = save_checkpoint(
        settings.export,
        loaded.model,
        img_size=loaded.img_size,
        mean=loaded.mean,
        std=loaded.std,
        metrics=metrics,
        provenance=provenance,
        half=settings.half,
        temperature=report["temperature"],
    )
    log.info("exported %s (temperature %.3f)", path, report["temperature"])
    return path


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    per = pd.DataFrame(report["official"]["per_category"])
    table = per[["sensitivity", "specificity", "auc", "auc_sens_80"]].copy()
    table["support"] = pd.Series(report["class_counts"])
    m = report["metrics"]
    lines = [
        "# DermaNet evaluation report",
        "",
        f"- checkpoint: `{report['checkpoint']}`",
        f"- split: {report['settings']['split']} ({report['images']} images), "
        f"test-time augmentation: {report['settings']['tta']}",
        f"- **balanced accuracy (official ISIC scorer): "
        f"{report['official']['balanced_accuracy']:.4f}**",
        f"- macro AUROC {m['macro_auroc']:.4f} · top-1 {m['top1']:.4f} · "
        f"macro F1 {m['macro_f1']:.4f}",
        f"- melanoma AUC {report['melanoma']['auc']:.4f}, sensitivity at 80% specificity "
        f"{report['melanoma']['sensitivity_at_80_specificity']:.4f}",
        f"- calibration: temperature {report['temperature']:.3f}, ECE "
        f"{report['ece_before']:.4f} -> {report['ece_after']:.4f}",
        "",
        "## Per class (official scorer)",
        "",
        _markdown_table(table),
        "",
        "![confusion matrix](confusion_matrix.png)",
        "![ROC curves](roc_curves.png)",
        "",
        "Research use only: not a medical device, not for diagnosis.",
    ]
    return "\n".join(lines) + "\n"


def _markdown_table(table: pd.DataFrame) -> str:
    """A Markdown table without the optional `tabulate` dependency."""
    header = "| class | " + " | ".join(table.columns) + " |"
    rule = "|---" * (len(table.columns) + 1) + "|"
    body = [
        f"| {name} | "
        + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row)
        + " |"
        for name, row in zip(table.index, table.itertuples(index=False), strict=True)
    ]
    return "\n".join([header, rule, *body])
