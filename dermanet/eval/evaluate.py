"""jobs/evaluate.py's logic: predict a split, score it officially, calibrate, plot, report.

Outputs in the chosen folder: predictions.csv (ISIC submission format), truth.csv, report.json,
report.md, roc_curves.png, confusion_matrix.png, reliability.png.

Calibration follows the served path: the server averages the checkpoint's served views
(`LoadedCheckpoint.tta`; one view unless exported with --served-views), so the temperature is
fitted on those validation logits and the reliability diagram and ECE are of those
probabilities, whatever test-time views the scores use.
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
import torch
from sklearn.metrics import roc_curve

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import SPLITS
from dermanet.data.pipelines import NormalizedBatches, PipelineConfig, build_pipeline
from dermanet.data.sources import DataSourceSettings, split_rows
from dermanet.eval.calibration import expected_calibration_error, fit_temperature
from dermanet.eval.isic_scorer import isic_submission, official_score
from dermanet.eval.metrics import (
    classification_metrics,
    confusion_matrix,
    melanoma_auroc,
    softmax,
)
from dermanet.eval.plots import confusion_matrix_figure, reliability_figure, roc_figure, save_figure
from dermanet.eval.trust_eval import fit_trust, quality_ok, trust_report, with_vignette
from dermanet.inference.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from dermanet.inference.predictor import Preprocessing
from dermanet.inference.tta import TTA_MODES, tta_views
from dermanet.settings import check_settings, option
from dermanet.tracking import register_export
from dermanet.trust.ood import DEFAULT_OOD_FPR, DEFAULT_OOD_METHOD, OOD_METHODS

log = logging.getLogger(__name__)


@dataclass
class EvaluateSettings(DataSourceSettings):
    """Everything jobs/evaluate.py accepts (its flags are generated from these fields)."""

    checkpoint: str = option(None, "DermaNet checkpoint (.pt) to evaluate", group="model")
    output: str = option(None, "folder for the report and predictions", group="output")
    split: list[str] = option(
        help="split(s) to score; 'all' scores every row (external sets)",
        group="data",
        choices=(*SPLITS, "all"),
        default_factory=lambda: ["test"],
    )
    origins: list[str] = option(
        help="score only images of these origins (e.g. the source a run left out)",
        group="data",
        metavar="ORIGIN",
        default_factory=list,
    )
    tta: str | None = option(
        None,
        "test-time views to score: none, flips (4 views), dihedral (8), multicrop (flips + 5 "
        "crops); a bare --tta means flips; default: the views the checkpoint is served with "
        "(after --served-views)",
        group="model",
        choices=TTA_MODES,
        const="flips",
    )
    served_views: str | None = option(
        None,
        "with --export: the test-time views the exported model is served with (the server, "
        "batch inference and Grad-CAM's answer average their logits; about Nx the model's "
        "compute); its temperature, gate and prediction sets are fitted on them. Default: "
        "the checkpoint's own (none for a training checkpoint)",
        group="output",
        choices=TTA_MODES,
    )
    calibrate: bool = option(
        True,
        "fit the temperature on the val split's served logits; without it, and when val "
        "itself or --split all is evaluated, the checkpoint's stored temperature is used",
        group="model",
    )
    batch_size: int = option(64, "inference batch size", group="model", minimum=1)
    export: str | None = option(
        None,
        "also write the model with its fitted temperature and these scores to this .pt "
        "(e.g. weights/default.pt: Serve then serves calibrated probabilities)",
        group="output",
    )
    half: bool = option(False, "--export in float16 (half the size)", group="output")
    ood_method: str = option(
        DEFAULT_OOD_METHOD,
        "the --export's gate: OOD score fitted on train features (docs/trust.md compares "
        "them; benchmarks/trust_gate.py measures them for a new model)",
        group="output",
        choices=OOD_METHODS,
    )
    ood_fpr: float = option(
        DEFAULT_OOD_FPR,
        "the --export's gate: share of EACH class's val images its OOD threshold may refuse "
        "(higher refuses more of everything, dermoscopy included)",
        group="output",
        minimum=0,
        maximum=0.5,
        exclusive=True,
    )
    ood: str | None = option(
        None,
        "folder of non-dermoscopic pictures (python -m tools.build_ood_set): report the gate's OOD "
        "AUROC and the share it refuses, next to the share of the evaluated split it refuses",
        group="output",
    )

    def validate(self) -> None:
        check_settings(self)
        if not self.checkpoint or not self.output:
            raise ValueError("give --checkpoint and --output")
        self.check_source()
        if self.export and not self.export.endswith(".pt"):
            raise ValueError("--export needs a .pt file name (the model registry lists *.pt)")
        if self.half and not self.export:
            raise ValueError("--half applies to --export; give --export PATH.pt")
        if self.served_views and not self.export:
            raise ValueError("--served-views applies to --export; give --export PATH.pt")
        gate_flags = (self.ood_method, self.ood_fpr) != (DEFAULT_OOD_METHOD, DEFAULT_OOD_FPR)
        if gate_flags and not self.export:
            raise ValueError(
                "--ood-method and --ood-fpr fit the --export's gate; give --export PATH.pt"
            )

    @property
    def split_name(self) -> str:
        """'test', 'train+val', 'all': how metric keys and titles name what was scored."""
        return "all" if "all" in self.split else "+".join(self.split)


@dataclass
class Predictions:
    """Logits per image: averaged over the scored views, and over the served ones."""

    logits: np.ndarray
    served_logits: np.ndarray  # what the server computes: averaged over the checkpoint's views
    features: np.ndarray  # pooled features of the plain view (OOD fitting), as served
    table: pd.DataFrame  # rows in prediction order: image, label_index, origin

    @property
    def labels(self) -> np.ndarray:
        return self.table["label_index"].to_numpy()


def _rows_like(view: Predictions, plain: Predictions) -> Predictions:
    """`view`'s rows in `plain`'s image order (Ray Data may return batches in another)."""
    position = pd.Series(np.arange(len(view.table)), index=view.table["image"].to_numpy())
    rows = position.loc[plain.table["image"].to_numpy()].to_numpy()
    return Predictions(view.logits[rows], view.served_logits[rows], view.features[rows],
                       view.table.iloc[rows])  # fmt: skip


def predict_split(
    loaded: LoadedCheckpoint,
    settings: EvaluateSettings,
    split: str | list[str],
    *,
    served_needed: bool = True,
) -> Predictions:
    """Run the model over a split (decoded by Ray Data, as in training's validation), with
    the views of `settings.tta` (None: the served ones) and, when `served_needed`, the served
    views (`loaded.tta`; otherwise `served_logits` are the scored ones)."""
    scored = settings.tta or loaded.tta
    rows = split_rows(settings.location, split, origins=settings.origins or None)
    config = PipelineConfig(img_size=loaded.img_size, color_constancy=loaded.color_constancy)
    batches = NormalizedBatches(
        build_pipeline(rows.dataset, "eval", config).iter_torch_batches(
            batch_size=settings.batch_size
        ),
        loaded.mean,
        loaded.std,
    )
    model = loaded.model.eval()
    averaged, served, features, indices = [], [], [], []
    with torch.inference_mode():
        for batch in batches:
            outputs = [model(view) for view in tta_views(batch["image"], scored)]
            logits = torch.stack([out.logits.float() for out in outputs]).numpy()
            averaged.append(logits.mean(axis=0))
            if loaded.tta == scored or not served_needed:
                served.append(averaged[-1])
            else:  # --tta other than the served views: those too (a report's extra line)
                views = tta_views(batch["image"], loaded.tta)
                served.append(np.mean([model(v).logits.float().numpy() for v in views], axis=0))
            features.append(outputs[0].features.float().numpy())
            indices.append(batch["index"].numpy())
    index = np.concatenate(indices)
    return Predictions(
        np.concatenate(averaged),
        np.concatenate(served),
        np.concatenate(features),
        rows.table.loc[index],
    )


def sensitivity_at_specificity(truth: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """Highest sensitivity whose specificity is at least `specificity` (ROC read-off)."""
    fpr, tpr, _ = roc_curve(truth, scores)
    allowed = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def score(probs: np.ndarray, labels: np.ndarray, image_ids: list[str]) -> dict[str, Any]:
    """Official balanced accuracy and per-class table, our metrics, melanoma read-offs."""
    official = official_score(image_ids, labels, probs)
    mel = CLASS_NAMES.index("MEL")
    is_mel = labels == mel
    has_mel = 0 < is_mel.sum() < len(labels)
    return {
        "images": len(labels),
        "official": {
            "balanced_accuracy": official.overall,
            "per_category": official.per_category.to_dict(orient="index"),
            "macro_average": official.macro_average.to_dict(),
            "absent_classes": official.absent,
        },
        "metrics": classification_metrics(probs, labels),
        "melanoma": {
            "auc": melanoma_auroc(probs, labels),
            "sensitivity_at_80_specificity": (
                sensitivity_at_specificity(is_mel, probs[:, mel], 0.8) if has_mel else float("nan")
            ),
        },
    }


def run_evaluation(settings: EvaluateSettings) -> dict[str, Any]:
    settings.validate()
    loaded = load_checkpoint(settings.checkpoint)
    if settings.export and settings.served_views:
        loaded.tta = settings.served_views  # what is fitted and scored as served below
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)

    splits = "all" if "all" in settings.split else settings.split
    predictions = predict_split(loaded, settings, splits)
    labels = predictions.labels
    temperature = loaded.temperature  # stored (1.0 for a training checkpoint) unless refitted
    # fitting needs the served views only, and sees every source
    whole = dataclasses.replace(settings, tta=loaded.tta, origins=[])
    val = None
    if settings.calibrate and splits != "all" and "val" not in splits:
        val = predict_split(loaded, whole, "val")
        temperature = fit_temperature(val.served_logits, val.labels)
    if settings.export:  # the shipped file carries a gate and sets fitted for these weights
        val = val or predict_split(loaded, whole, "val")
        # the gate is fitted on the plain view's features: no other view is needed; the
        # same train and val images seen through a dermatoscope's round frame are its
        # second reference view
        plain = dataclasses.replace(whole, tta="none")
        train = predict_split(loaded, plain, "train", served_needed=False)
        framed = with_vignette(loaded)
        framed_train = predict_split(framed, plain, "train", served_needed=False)
        framed_val = predict_split(framed, plain, "val", served_needed=False)
        framed_train = _rows_like(framed_train, train)  # the same images, row for row
        framed_val = _rows_like(framed_val, val)
        loaded.temperature = temperature
        loaded.trust = fit_trust(
            train.features, train.labels, val.features, val.served_logits, val.labels,
            temperature, ood_method=settings.ood_method, ood_fpr=settings.ood_fpr,
            views=[(framed_train.features, framed_val.features, framed_val.served_logits)],
        )  # fmt: skip
    probs = softmax(predictions.logits, temperature)
    served_raw = softmax(predictions.served_logits)
    served = softmax(predictions.served_logits, temperature)

    image_ids = predictions.table["image"].astype(str).tolist()
    isic_submission(image_ids, probs).to_csv(out / "predictions.csv", index=False)
    isic_submission(image_ids, np.eye(len(CLASS_NAMES))[labels]).to_csv(
        out / "truth.csv", index=False
    )
    report: dict[str, Any] = {
        "checkpoint": str(settings.checkpoint),
        "model": loaded.version.to_dict() if loaded.version else None,  # the file scored
        "settings": dataclasses.asdict(settings),
        "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(CLASS_NAMES)},
        "temperature": temperature,
        "served_views": loaded.tta,
        # Calibration of what the server returns: softmax(served logits / T).
        "ece_before": expected_calibration_error(served_raw, labels),
        "ece_after": expected_calibration_error(served, labels),
        **score(probs, labels, image_ids),
    }
    if (settings.tta or loaded.tta) != loaded.tta:
        report["served"] = score(served, labels, image_ids)
    if loaded.trust or settings.ood:
        rows = split_rows(settings.location, splits, origins=settings.origins or None)
        loaded.temperature = temperature
        report["trust"] = trust_report(
            loaded,
            predictions.served_logits,
            predictions.features,
            labels,
            quality_ok(
                rows.dataset,
                predictions.table.index.to_numpy(),
                Preprocessing.for_checkpoint(loaded),
            ),
            settings.ood,
            predictions.table["origin"].astype(str).to_numpy(),
            (rows.dataset, predictions.table.index.to_numpy()),
        )
    origins = predictions.table["origin"]
    if origins.notna().any() and origins.nunique() > 1:
        report["per_origin"] = {
            str(origin): score(probs[mask], labels[mask], list(np.asarray(image_ids)[mask]))
            for origin in sorted(origins.dropna().unique())
            if (mask := (origins == origin).to_numpy()).sum() > 1
        }
    matrix = confusion_matrix(labels, probs.argmax(axis=1), len(CLASS_NAMES))
    report["confusion_matrix"] = matrix.tolist()
    save_figure(confusion_matrix_figure(matrix, title=f"{settings.split_name} split"),
                out / "confusion_matrix.png")  # fmt: skip
    save_figure(roc_figure(probs, labels), out / "roc_curves.png")
    save_figure(
        reliability_figure(
            {
                f"raw softmax (ECE {report['ece_before']:.3f})": (served_raw, labels),
                f"T = {temperature:.2f} (ECE {report['ece_after']:.3f})": (served, labels),
            }
        ),
        out / "reliability.png",
    )
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(render_markdown(report))
    log.info("balanced accuracy %.4f on %d images", report["official"]["balanced_accuracy"],
             len(labels))  # fmt: skip
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
    split = settings.split_name
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
        f"{split}_tta": settings.tta or loaded.tta,
    }  # the temperature travels once, as the checkpoint's calibration
    provenance = {
        **loaded.provenance,
        "exported_from": str(settings.checkpoint),
        "evaluated_on": f"{split} split of {settings.location.describe()}",
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
        preprocessing={"color_constancy": loaded.color_constancy, "tta": loaded.tta},
        trust=loaded.trust,
    )
    log.info("exported %s (temperature %.3f)", path, report["temperature"])
    register_export(Path(path), Path(settings.output), metrics)  # when MLflow tracks
    return path


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    per = pd.DataFrame(report["official"]["per_category"]).T
    table = per[["sensitivity", "specificity", "auc", "auc_sens_80"]].copy()
    table["support"] = pd.Series(report["class_counts"])
    m = report["metrics"]
    absent = report["official"]["absent_classes"]
    lines = [
        "# DermaNet evaluation report",
        "",
        f"- checkpoint: `{report['checkpoint']}`"
        + (
            f" (sha256 `{report['model']['sha256']}`, created {report['model']['created']})"
            if report.get("model")
            else ""
        ),
        f"- split: {'+'.join(report['settings']['split'])} ({report['images']} images), "
        f"test-time views: {report['settings']['tta'] or report['served_views']}",
        f"- **balanced accuracy (official ISIC scorer): "
        f"{report['official']['balanced_accuracy']:.4f}**",
        f"- macro AUROC {m['macro_auroc']:.4f} · top-1 {m['top1']:.4f} · "
        f"macro F1 {m['macro_f1']:.4f}",
        f"- melanoma AUC {report['melanoma']['auc']:.4f}, sensitivity at 80% specificity "
        f"{report['melanoma']['sensitivity_at_80_specificity']:.4f}",
        f"- calibration of the served path (views: {report['served_views']}): temperature "
        f"{report['temperature']:.3f}, "
        f"ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f} (reliability.png)",
    ]
    if absent:
        lines.append(
            f"- classes with no image here, left out of per-class and averaged metrics: "
            f"{', '.join(absent)}"
        )
    if "served" in report:
        sv = report["served"]
        lines.append(
            f"- served views ({report['served_views']}, what the server does): balanced accuracy "
            f"{sv['official']['balanced_accuracy']:.4f}, macro AUROC "
            f"{sv['metrics']['macro_auroc']:.4f}"
        )
    if "trust" in report:
        lines += ["", "## Knowing when not to answer (gate and prediction sets)", ""]
        lines += _trust_lines(report["trust"])
    lines += ["", "## Per class (official scorer)", "", _markdown_table(table)]
    if "per_origin" in report:
        rows = pd.DataFrame.from_dict(  # one row per origin; counts stay integers
            {
                origin: {
                    "images": r["images"],
                    "balanced accuracy": r["official"]["balanced_accuracy"],
                    "macro AUROC": r["metrics"]["macro_auroc"],
                    "melanoma AUC": r["melanoma"]["auc"],
                    "classes present": len(CLASS_NAMES) - len(r["official"]["absent_classes"]),
                }
                for origin, r in report["per_origin"].items()
            },
            orient="index",
        )
        lines += ["", "## Per origin (image source)", "", _markdown_table(rows)]
    lines += [
        "",
        "![confusion matrix](confusion_matrix.png)",
        "![ROC curves](roc_curves.png)",
        "![reliability](reliability.png)",
        "",
        "Research use only: not a medical device, not for diagnosis.",
    ]
    return "\n".join(lines) + "\n"


def _trust_lines(trust: dict[str, Any]) -> list[str]:
    lines = [
        f"- the gate refuses {100 * trust['gate_rejected']:.1f} % of these images "
        f"({100 * trust['quality_rejected']:.1f} % on quality alone)"
    ]
    if "sets" in trust:
        sets = trust["sets"]
        lines.append(
            f"- prediction sets (target {100 * sets['target_coverage']:.0f} %): coverage "
            f"{sets['coverage']:.3f}, mean size {sets['mean_size']:.2f}, single class "
            f"{100 * sets['singletons']:.0f} % of the time; per class: "
            + ", ".join(f"{c} {v['coverage']:.2f}" for c, v in sets["per_class"].items() if v["n"])
        )
    if "per_class" in trust:
        lines += ["", _refusal_table(trust["per_class"], "class")]
    if "per_source" in trust and len(trust["per_source"]) > 1:
        lines += ["", _refusal_table(trust["per_source"], "image source")]
    if "ood_set" in trust:
        ood = trust["ood_set"]
        kinds = ", ".join(f"{k} {100 * v['rejected']:.0f} %" for k, v in ood["per_kind"].items())
        lines.append(
            f"- non-dermoscopic set ({ood['n_out']} pictures): OOD AUROC {ood['auroc']:.3f}, "
            f"{100 * ood['out_rejected']:.1f} % refused ({kinds}) while "
            f"{100 * ood['in_rejected']:.1f} % of these images are"
        )
    return lines


def _refusal_table(rows: dict[str, dict[str, Any]], what: str) -> str:
    """The gate per class or source: refused share, and coverage / set size where accepted."""
    table = pd.DataFrame(rows).T
    table = table[table["n"] > 0]
    names = {"n": "images", "refused": "refused", "coverage": "set coverage (accepted)",
             "mean_size": "mean set size (accepted)"}  # fmt: skip
    table = table.rename(columns=names).rename_axis(what)
    table["images"] = table["images"].astype(int)
    return _markdown_table(table)


def _markdown_table(table: pd.DataFrame) -> str:
    """A Markdown table without the optional `tabulate` dependency."""
    header = "| | " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|---" * (len(table.columns) + 1) + "|"
    body = [
        f"| {name} | " + " | ".join(_cell(v) for v in row) + " |"
        for name, row in zip(table.index, table.itertuples(index=False), strict=True)
    ]
    return "\n".join([header, rule, *body])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if np.isnan(value) else f"{value:.4f}"
    return str(value)
