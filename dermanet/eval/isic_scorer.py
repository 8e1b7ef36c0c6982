"""The official ISIC challenge scorer (isic-challenge-scoring 5.6.0), made to run on pandas 3.

5.6.0 is the last release for Python 3.11 and calls `DataFrame.applymap` once (a range check in
load_csv.py); pandas 3 removed that alias of `DataFrame.map`. We restore the alias, only when it
is missing, before the scorer is used. Nothing else in the scorer is touched.
"""

from __future__ import annotations

import io

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


def official_score(
    image_ids: list[str], labels: np.ndarray, probs: np.ndarray
) -> ClassificationScore:
    """Score predictions with the official scorer (target metric: balanced accuracy)."""
    truth = isic_submission(image_ids, np.eye(len(CLASS_NAMES))[labels])
    predictions = isic_submission(image_ids, probs)
    return ClassificationScore.from_stream(
        io.StringIO(truth.to_csv(index=False)),
        io.StringIO(predictions.to_csv(index=False)),
        ClassificationMetric.BALANCED_ACCURACY,
    )
