"""The model's own view of an image: pooled features and logits from one forward pass.

The OOD detector and the prediction sets are fitted on exactly what serving computes, so
features and logits come through the same `Predictor` call (preprocessing, engine, and the
checkpoint's test-time views: logits averaged over them, features of the plain view).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from dermanet.data.images import decode_image
from dermanet.inference.predictor import Predictor


def extract_features(
    predictor: Predictor, images: Iterable[np.ndarray], batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, D), logits float32 (N, K)) for RGB uint8 images, in order.

    `images` may be a lazy iterator (e.g. `iter_images(paths)`): only one batch is decoded
    at a time. Logits are raw (divide by the checkpoint's temperature for probabilities).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    features, logits = [], []
    iterator = iter(images)
    while batch := list(islice(iterator, batch_size)):
        batch_logits, batch_features = predictor.forward(batch)  # the served model call
        features.append(batch_features)
        logits.append(batch_logits)
    if not features:
        dim = predictor.checkpoint.config.feature_dim
        return np.zeros((0, dim), np.float32), np.zeros((0, len(predictor.checkpoint.class_names)),
                                                        np.float32)  # fmt: skip
    return np.concatenate(features), np.concatenate(logits)


def iter_images(
    paths: Iterable[str | Path], decode: Callable[[bytes], np.ndarray] = decode_image
) -> Iterator[np.ndarray]:
    """Decode image files lazily into RGB uint8 (any mode). Pass `Predictor.decode` to see
    them as the server does (JPEGs at a reduced DCT scale); the default decodes at full size."""
    for path in paths:
        yield decode(Path(path).read_bytes())
