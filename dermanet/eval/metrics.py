"""Classification metrics from probabilities, with our ISIC conventions.

Balanced accuracy is the ISIC 2019 metric: the mean over classes of per-class recall
(classes absent from the labels are left out, as the official scorer does). Recall and AUROC
are counted with numpy (equal to scikit-learn's, a test) so a bootstrap can call them
thousands of times.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn import metrics

from dermanet.classes import CLASS_INDEX, CLASS_NAMES

MELANOMA = CLASS_INDEX["MEL"]


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted] (scikit-learn's, with every class as a row and column)."""
    return metrics.confusion_matrix(labels, predicted, labels=list(range(num_classes)))


def per_class_recall(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall per class; NaN for classes with no true example (counted with numpy: a bootstrap
    calls this thousands of times)."""
    labels = np.asarray(labels, dtype=np.int64)
    support = np.bincount(labels, minlength=num_classes).astype(float)
    hits = np.bincount(labels[labels == np.asarray(predicted)], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, hits / support, np.nan)


def per_class_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """F1 per class; NaN for classes with no true example."""
    f1 = metrics.f1_score(
        labels, predicted, labels=list(range(num_classes)), average=None, zero_division=0.0
    )
    support = np.bincount(labels, minlength=num_classes)
    return np.where(support > 0, f1, np.nan)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """The area under the ROC curve: P(a positive scores above a negative), ties counting a
    half (the Mann-Whitney form, equal to scikit-learn's `roc_auc_score`: a test). NaN when
    there are no positives or no negatives. The one AUROC of evaluation, training,
    comparison and plots."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = rankdata(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_class_auroc(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One-vs-rest `auroc` per class; NaN where a class has no positives or no negatives."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return np.array([auroc(probs[:, k], labels == k) for k in range(probs.shape[1])])


def melanoma_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """MEL vs the rest: how well P(MEL) ranks melanomas above everything else (the evaluation
    report's melanoma AUC and jobs/compare.py's melanoma_auroc)."""
    return auroc(np.asarray(probs)[:, MELANOMA], np.asarray(labels) == MELANOMA)


def defined_mean(per_class: np.ndarray) -> float:
    """Mean over the classes where a per-class metric is defined (NaN if none is)."""
    return float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")


def balanced_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the classes present in `labels` (the ISIC 2019 metric)."""
    return defined_mean(per_class_recall(labels, np.argmax(probs, axis=1), probs.shape[1]))


def macro_auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean one-vs-rest AUROC over the classes with positives and negatives (NaN if none)."""
    return defined_mean(per_class_auroc(probs, labels))


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES
) -> dict[str, float]:
    """Flat dict: top1, top5, balanced_accuracy, macro_auroc, macro_f1, recall_<CLS>, auroc_<CLS>.

    `probs` (N, K) rows sum to 1; `labels` (N,) class indices.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"need probs (N, K) and labels (N,), got {probs.shape}, {labels.shape}")
    if not np.isfinite(probs).all():  # ranks would carry NaN into the AUROC without a word
        raise ValueError("probabilities contain NaN or inf: the model's output is not finite")
    predicted = probs.argmax(axis=1)
    recall = per_class_recall(labels, predicted, probs.shape[1])
    auroc = per_class_auroc(probs, labels)
    result = {
        "top1": float((predicted == labels).mean()),
        "top5": top_k_accuracy(probs, labels, 5),
        "balanced_accuracy": defined_mean(recall),
        "macro_auroc": defined_mean(auroc),
        "macro_f1": float(np.nanmean(per_class_f1(labels, predicted, probs.shape[1]))),
    }
    for name, r, a in zip(class_names, recall, auroc, strict=True):
        result[f"recall_{name}"] = float(r)
        result[f"auroc_{name}"] = float(a)
    return result


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
