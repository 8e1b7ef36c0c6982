"""Grad-CAM explanations through pytorch-grad-cam, rendered as PNGs for people.

The machinery (model wrapper, CAM computation, explanation) lives here once; each display mode
is a small render function in RENDERERS, the way pytorch-grad-cam keeps variants small.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from dermanet.classes import CLASS_NAMES
from dermanet.data.images import shrink_image
from dermanet.inference.predictor import Prediction, Predictor, resolve_class
from dermanet.models import DermResNetSE
from dermanet.models.dermresnet import FeatureGrid

DEFAULT_MAX_SIDE = 768  # rendered PNGs are downscaled to this longest side


class ExplainedLogits(nn.Module):
    """The model's logits as a plain tensor for pytorch-grad-cam (DermNetOutput is not one),
    with the gradients the model says explanations need (`explainable_logits`)."""

    def __init__(self, model: DermResNetSE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.explainable_logits(x)


class NativeGradCAM(GradCAM):
    """GradCAM that returns the map at the feature grid's own resolution.

    pytorch-grad-cam would resize it with cv2, which assumes each cell is centred in its
    stride block; we upsample with the network's real geometry instead
    (`DermResNetSE.feature_grid`).
    """

    def get_target_width_height(self, input_tensor: torch.Tensor) -> None:
        return None


def upsample_cam(cam: np.ndarray, size: tuple[int, int], grid: FeatureGrid) -> np.ndarray:
    """Bilinear upsampling of a feature-grid CAM to an input of (width, height) `size`."""
    scale = 1.0 / grid.stride
    matrix = np.array([[scale, 0, -grid.offset * scale], [0, scale, -grid.offset * scale]])
    return cv2.warpAffine(
        cam.astype(np.float32),
        matrix,
        size,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def compute_cams(
    model: DermResNetSE, input_tensor: torch.Tensor, target_indices: list[int]
) -> np.ndarray:
    """Grad-CAM of the last stage for each image and its target class: (N, H, W) in [0, 1].

    The maps have the input tensor's spatial size (the model's input size), aligned with it.
    """
    wrapper = ExplainedLogits(model).eval()
    targets = [ClassifierOutputTarget(int(i)) for i in target_indices]
    with NativeGradCAM(model=wrapper, target_layers=[model.cam_layer]) as cam:
        maps = cam(input_tensor=input_tensor, targets=targets)
    grid = model.feature_grid()
    size = (int(input_tensor.shape[-1]), int(input_tensor.shape[-2]))
    full = np.stack([upsample_cam(m, size, grid) for m in np.nan_to_num(maps)])
    return np.clip(full, 0.0, 1.0).astype(np.float32)


def colorize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CAM in [0, 1] → RGB uint8 JET heatmap of (width, height) `size`."""
    resized = cv2.resize(cam.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    bgr = cv2.applyColorMap(np.uint8(np.clip(resized, 0, 1) * 255), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def render_heatmap(image: np.ndarray, cam: np.ndarray, opacity: float) -> np.ndarray:
    """The heatmap alone (opacity does not apply)."""
    return colorize(cam, (image.shape[1], image.shape[0]))


def render_overlay(image: np.ndarray, cam: np.ndarray, opacity: float) -> np.ndarray:
    """Heatmap blended over the image; opacity 0 shows the image, 1 the heatmap."""
    heat = colorize(cam, (image.shape[1], image.shape[0])).astype(np.float32)
    blended = (1.0 - opacity) * image.astype(np.float32) + opacity * heat
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def render_side_by_side(image: np.ndarray, cam: np.ndarray, opacity: float) -> np.ndarray:
    """The image and its overlay next to each other."""
    return np.hstack([image, render_overlay(image, cam, opacity)])


RENDERERS: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "overlay": render_overlay,
    "heatmap": render_heatmap,
    "side_by_side": render_side_by_side,
}
RENDER_MODES = tuple(RENDERERS)


def render(image: np.ndarray, cam: np.ndarray, mode: str = "overlay", opacity: float = 0.5):
    """Render one display mode; the image is RGB uint8, the CAM any size in [0, 1]."""
    if mode not in RENDERERS:
        raise ValueError(f"unknown display mode {mode!r}; use one of {list(RENDER_MODES)}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
    return RENDERERS[mode](image, cam, float(opacity))


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Explanation:
    """A Grad-CAM result: the PNG, the raw CAM (model input size) and what it explains."""

    png: bytes
    cam: np.ndarray
    target_class: str
    target_probability: float
    prediction: Prediction
    mode: str
    opacity: float


class GradCamExplainer:
    """Explains a Predictor's decisions; one explanation at a time (CAM hooks are per model)."""

    def __init__(self, predictor: Predictor, max_side: int = DEFAULT_MAX_SIDE):
        self.predictor = predictor
        self.max_side = int(max_side)
        self._lock = threading.Lock()

    def explain(
        self,
        image: np.ndarray,
        target: str | int | None = None,
        mode: str = "overlay",
        opacity: float = 0.5,
    ) -> Explanation:
        """CAM for `target` (name or index; default the predicted class), rendered in `mode`."""
        if mode not in RENDERERS:
            raise ValueError(f"unknown display mode {mode!r}; use one of {list(RENDER_MODES)}")
        if not 0.0 <= float(opacity) <= 1.0:
            raise ValueError(f"opacity must be between 0 and 1, got {opacity}")
        index = None if target is None else resolve_class(target)
        with self._lock:  # CAM hooks would also see a concurrent forward on the same model
            prediction = self.predictor.predict(image)
            if index is None:
                index = CLASS_NAMES.index(prediction.top_class)
            cam = compute_cams(self.predictor.model, self.predictor.to_tensor([image]), [index])[0]
        picture = render(shrink_image(image, self.max_side, "long"), cam, mode, float(opacity))
        name = CLASS_NAMES[index]
        return Explanation(
            png=encode_png(picture),
            cam=cam,
            target_class=name,
            target_probability=prediction.probabilities[name],
            prediction=prediction,
            mode=mode,
            opacity=float(opacity),
        )
