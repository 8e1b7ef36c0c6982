"""The official ISIC challenge scorer (isic-challenge-scoring 5.6.0), made to run on pandas 3.

5.6.0 is the last release for Python 3.11 and calls `DataFrame.applymap` once (a range check in
load_csv.py); pandas 3 removed that alias of `DataFrame.map`. We restore the alias, only when it
is missing, before the scorer is used. Nothing else in the scorer is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from dermanet.classes import CLASS_NAMES

if not hasattr(pd.DataFrame, "applymap"):
    pd.DataFrame.applymap = pd.DataFrame.map  # type: ignore[attr-defined]

from isic_challenge_scoring import ClassificationMetric, ClassificationScore


def isic_submission(image_ids: list[str], probs: np.ndarray) -> pd.DataFrame:
    """`image` + one probability column per class, the ISIC 2019 submission format."""
    table = pd.DataFrame(probs, columns=list(CLASS_NAMES))
    table.insert(0, "image", list(image_ids))
    return table


@dataclass
class OfficialScore:
    """The official scorer's numbers over the classes present in the truth.

    overall: balanced accuracy (mean recall over present classes; predictions are the argmax
    over all 8 classes, so predicting an absent class counts as a miss). per_category /
    macro_average: the scorer's per-class table (sensitivity, specificity, AUC, auc_sens_80,
    ...) for present classes only. absent: classes with no true example, left out of both, as
    the ISIC 2018 scorer did for its 7 classes (the official code fails on them).
    """

    overall: float
    per_category: pd.DataFrame
    macro_average: pd.Series
    absent: list[str]


def official_score(image_ids: list[str], labels: np.ndarray, probs: np.ndarray) -> OfficialScore:
    """Score predictions with the official scorer (target metric: balanced accuracy)."""
    labels = np.asarray(labels)
    present = [c for i, c in enumerate(CLASS_NAMES) if (labels == i).any()]
    absent = [c for c in CLASS_NAMES if c not in present]
    truth = isic_submission(image_ids, np.eye(len(CLASS_NAMES))[labels]).set_index("image")
    predictions = isic_submission(image_ids, probs).set_index("image")
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=truth.index)
    score = ClassificationScore(
        truth[present], predictions[present], weights, ClassificationMetric.BALANCED_ACCURACY
    )
    if not absent:
        overall = float(score.overall)
    else:  # the scorer's argmax would run over present columns only: score all 8 instead
        predicted = probs.argmax(axis=1)
        overall = float(np.mean([(predicted[labels == CLASS_NAMES.index(c)]
                                  == CLASS_NAMES.index(c)).mean() for c in present]))  # fmt: skip
    return OfficialScore(overall, score.per_category, score.macro_average, absent)
