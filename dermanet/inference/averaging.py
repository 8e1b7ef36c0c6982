"""Uniform weight averages of classifier checkpoints ("model soups").

Checkpoints of one training lineage (a warm restart and the model it started from, or two
epochs of one run) sit in one basin of the loss, so the mean of their weights is a model of
its own that often holds better on images from other sources than either parent. Only
checkpoints that share an architecture and preprocessing are averaged; everything else is an
error that says which file differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dermanet.inference.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint


def average_checkpoints(
    paths: Sequence[str | Path], output: str | Path, img_size: int | None = None
) -> Path:
    """Write the uniform average of `paths` (classifier checkpoints) to `output`.

    Floating-point tensors (weights and BatchNorm statistics) are averaged, integer counters
    are taken from the first file. The average serves at `img_size` (default: the first
    file's); it carries no metrics, temperature, served views or trust statistics, which
    `jobs/evaluate.py --export` fits for it.
    """
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(paths)}")
    loaded = [load_checkpoint(path) for path in paths]
    first = loaded[0]
    for other in loaded[1:]:
        _check_compatible(first, other)
    states = [item.model.state_dict() for item in loaded]
    averaged = {
        name: torch.stack([s[name].float() for s in states]).mean(0)
        if value.is_floating_point()
        else value
        for name, value in states[0].items()
    }
    first.model.load_state_dict(averaged)
    return save_checkpoint(
        output,
        first.model,
        img_size=int(img_size or first.img_size),
        mean=first.mean,
        std=first.std,
        preprocessing={"color_constancy": first.color_constancy},
        provenance={
            "weight_average_of": [str(Path(p).resolve()) for p in paths],
            "img_sizes_trained": [item.img_size for item in loaded],
        },
    )


def _check_compatible(first: LoadedCheckpoint, other: LoadedCheckpoint) -> None:
    for what, a, b in (
        ("model_config", first.config.to_dict(), other.config.to_dict()),
        ("normalization", (first.mean, first.std), (other.mean, other.std)),
        ("color_constancy", first.color_constancy, other.color_constancy),
    ):
        if a != b:
            raise ValueError(
                f"cannot average {other.path} with {first.path}: their {what} differs "
                f"({b} vs {a}); average checkpoints of one architecture and preprocessing"
            )
