"""Batched prediction from a loaded checkpoint, with training's evaluation preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dermanet.classes import CLASS_INDEX, CLASS_NAMES, NUM_CLASSES
from dermanet.data.images import DEFAULT_MAX_PIXELS, decode_image
from dermanet.data.transforms import eval_transform, to_model_input
from dermanet.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from dermanet.inference.risk import RiskAssessment, RiskPolicy


class UnknownClassError(ValueError):
    """A class name or index outside the class contract."""


def resolve_class(target: str | int) -> int:
    """Class name (case-insensitive) or index (also as a digit string) → index."""
    text = str(target).strip()
    if text.upper() in CLASS_INDEX:
        return CLASS_INDEX[text.upper()]
    if text.lstrip("-").isdigit() and 0 <= int(text) < NUM_CLASSES:
        return int(text)
    raise UnknownClassError(
        f"unknown class {target!r}; use a name from {list(CLASS_NAMES)} or an index 0.."
        f"{NUM_CLASSES - 1}"
    )


@dataclass(frozen=True)
class Prediction:
    """Per-class probabilities (CLASS_NAMES order), the top class and its risk assessment."""

    probabilities: dict[str, float]
    top_class: str
    top_probability: float
    risk: RiskAssessment

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON shape shared by the HTTP API and the dashboard."""
        return {
            "probabilities": dict(self.probabilities),
            "top_class": self.top_class,
            "top_probability": self.top_probability,
            **self.risk.to_dict(),
        }


class Predictor:
    """A model in eval mode plus its exact preprocessing; thread-compatible for inference."""

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        risk_policy: RiskPolicy | None = None,
        device: str | torch.device = "cpu",
    ):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        self.risk_policy = risk_policy or RiskPolicy()
        self.transform = eval_transform(
            checkpoint.img_size,
            checkpoint.mean,
            checkpoint.std,
            color_constancy=checkpoint.color_constancy,
        )

    @classmethod
    def from_path(cls, path: str | Path, risk_policy: RiskPolicy | None = None) -> Predictor:
        return cls(load_checkpoint(path), risk_policy)

    @property
    def img_size(self) -> int:
        return self.checkpoint.img_size

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) → float32 (3, img_size, img_size), exactly as in evaluation."""
        if not (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.ndim == 3
            and image.shape[2] == 3
        ):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {got}")
        return to_model_input(self.transform, image)

    def to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Preprocess a list of RGB images into one (N, 3, S, S) tensor on the model's device."""
        return torch.from_numpy(np.stack([self.preprocess(im) for im in images])).to(self.device)

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated softmax probabilities (N, NUM_CLASSES), float64 for exact sums.

        Logits are divided by the checkpoint's fitted temperature (1.0 when it has none), so a
        served 0.8 means right about 80% of the time on the data it was calibrated on.
        """
        if not images:
            return np.zeros((0, NUM_CLASSES))
        with torch.inference_mode():
            logits = self.model(self.to_tensor(images)).logits.float()
        return torch.softmax(logits.double() / self.checkpoint.temperature, dim=1).cpu().numpy()

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict a batch of RGB uint8 images in one forward pass."""
        return [self.prediction_from_probabilities(p) for p in self.probabilities(images)]

    def predict(self, image: np.ndarray) -> Prediction:
        return self.predict_batch([image])[0]

    def predict_bytes(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prediction:
        """Decode (any mode, size-limited) and predict; raises ImageDecodeError on bad data."""
        return self.predict(decode_image(data, max_pixels=max_pixels))

    def prediction_from_probabilities(self, probs: np.ndarray) -> Prediction:
        values = {name: float(p) for name, p in zip(CLASS_NAMES, probs, strict=True)}
        top = int(np.argmax(probs))
        return Prediction(
            probabilities=values,
            top_class=CLASS_NAMES[top],
            top_probability=values[CLASS_NAMES[top]],
            risk=self.risk_policy.assess(values),
        )
