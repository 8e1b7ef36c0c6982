"""Grad-CAM explanations, rendered as PNGs for people.

One explanation is ONE forward and ONE short backward on the already preprocessed input: the
forward gives the logits, pooled features and last-stage feature map (so the answer, the gate
and the prediction set come from the same pass as the CAM), the backward runs from the target
logit to the last stage only (`torch.autograd.grad`), not through the whole network into every
weight as a generic CAM library does. On the ONNX backend the forward is ONNX Runtime's (the
classify call itself, every served view, with the feature map as an extra output) and torch
runs only the pooling and head on that map for the gradient (`cam_from_feature_map`). The CAM
is pytorch-grad-cam's GradCAM (the tests check it against that library) upsampled with the
network's real geometry straight to the displayed size. Each display mode is a small render
function in RENDERERS.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from dermanet.classes import CLASS_NAMES
from dermanet.data.images import DEFAULT_MAX_PIXELS, decode_image, shrink_image
from dermanet.inference.predictor import Prediction, Predictor, resolve_class
from dermanet.inference.tta import tta_views
from dermanet.models import DermResNetSE
from dermanet.models.dermresnet import FeatureGrid

DEFAULT_MAX_SIDE = 768  # rendered PNGs are downscaled to this longest side
# zlib level 3 with the run-length strategy: on a 427x320 overlay 125 KiB in 9-12 ms against
# Pillow's level 1 at 155 KiB in 12-14 ms (the PNG is a fifth of a Grad-CAM call's time); the
# picture travels once, to a browser
PNG_OPTIONS = [
    cv2.IMWRITE_PNG_COMPRESSION,
    3,
    cv2.IMWRITE_PNG_STRATEGY,
    cv2.IMWRITE_PNG_STRATEGY_RLE,
]


def upsample_cam(
    cam: np.ndarray,
    size: tuple[int, int],
    grid: FeatureGrid,
    input_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Bilinear upsampling of a feature-grid CAM to (width, height) `size`.

    The grid's geometry is in model-input pixels (cell j is centred on pixel offset + stride
    * j). When `size` is not the input's own (`input_size`, e.g. the displayed image), the map
    is stretched the way the image was squashed into the input (pixel centres aligned), in the
    same single warp.
    """
    in_w, in_h = input_size or size
    sx, sy = size[0] / in_w, size[1] / in_h
    # cell j → input pixel u = offset + stride j → output pixel (u + 0.5) s - 0.5
    ax, bx = grid.stride * sx, (grid.offset + 0.5) * sx - 0.5
    ay, by = grid.stride * sy, (grid.offset + 0.5) * sy - 0.5
    inverse = np.array([[1 / ax, 0, -bx / ax], [0, 1 / ay, -by / ay]])
    return cv2.warpAffine(
        cam.astype(np.float32),
        inverse,
        size,
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


@dataclass
class CamPass:
    """What one forward + backward gives: the answer's inputs and the grid-resolution CAMs."""

    logits: np.ndarray  # (N, K) float32, equal to the model's forward logits
    features: np.ndarray  # (N, D) float32 pooled features (the OOD score's input)
    targets: list[int]  # the class each CAM explains
    grid_cams: np.ndarray  # (N, h, w) in [0, 1], at the last stage's resolution


def cam_pass(
    model: DermResNetSE, x: torch.Tensor, targets: Sequence[int] | None = None, views: int = 1
) -> CamPass:
    """Grad-CAM of the last stage (`model.cam_layer`) in one forward and one backward.

    `x` may hold `views` test-time views of N images, view-major (`torch.cat(tta_views(...))`,
    the plain view first): the answer's logits are averaged over the views, `targets` default
    to each image's top class of that average, and the CAM and features are the plain view's.
    The logits come from `explainable_logits` (the forward values are the model's; LayerNorm's
    scale is held constant only in the backward pass, see DermResNetSE). Not thread-safe per
    model: the caller serialises.
    """
    n = len(x) // views
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output):
            captured[name] = output

        return hook

    handles = [model.cam_layer.register_forward_hook(keep("maps")),
               model.pool.register_forward_hook(keep("features"))]  # fmt: skip
    try:
        with torch.enable_grad():
            logits = model.explainable_logits(x)
            maps = captured["maps"]
            averaged = logits.reshape(views, n, -1).mean(dim=0)
            chosen = averaged.argmax(1).tolist() if targets is None else list(map(int, targets))
            score = logits[torch.arange(n), chosen].sum()  # the plain view (the first n rows)
            (grads,) = torch.autograd.grad(score, maps)
    finally:
        for handle in handles:
            handle.remove()
    return CamPass(
        logits=averaged.detach().float().cpu().numpy(),
        features=captured["features"][:n].detach().float().cpu().numpy(),
        targets=chosen,
        grid_cams=grid_cams(grads[:n], maps[:n]),
    )


def cam_from_feature_map(
    model: DermResNetSE, feature_map: np.ndarray, targets: Sequence[int]
) -> np.ndarray:
    """Grad-CAMs (N, h, w) from a last-stage feature map another engine computed (ONNX
    Runtime's forward): the gradient runs through the pooling and head alone. Thread-safe."""
    maps = torch.from_numpy(np.ascontiguousarray(feature_map, dtype=np.float32))
    maps = maps.to(next(model.parameters()).device).requires_grad_(True)
    with torch.enable_grad():
        logits = model.explainable_head(maps)
        score = logits[torch.arange(len(maps)), list(map(int, targets))].sum()
        (grads,) = torch.autograd.grad(score, maps)
    return grid_cams(grads, maps)


def grid_cams(grads: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """Grad-CAM's weighting: channels weighted by their mean gradient, ReLU, scaled to [0, 1]."""
    with torch.no_grad():
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cams = torch.relu((weights * maps).sum(dim=1)).float().cpu().numpy()
    lo = cams.min(axis=(1, 2), keepdims=True)
    cams = (cams - lo) / (1e-7 + (cams - lo).max(axis=(1, 2), keepdims=True))
    return np.nan_to_num(cams).astype(np.float32)


def compute_cams(
    model: DermResNetSE, input_tensor: torch.Tensor, target_indices: list[int]
) -> np.ndarray:
    """Grad-CAM of the last stage for each image and its target class: (N, H, W) in [0, 1].

    The maps have the input tensor's spatial size (the model's input size), aligned with it.
    """
    result = cam_pass(model, input_tensor, target_indices)
    grid = model.feature_grid()
    size = (int(input_tensor.shape[-1]), int(input_tensor.shape[-2]))
    full = np.stack([upsample_cam(m, size, grid) for m in result.grid_cams])
    return np.clip(full, 0.0, 1.0).astype(np.float32)


def colorize(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """CAM in [0, 1] → RGB uint8 JET heatmap of (width, height) `size`."""
    resized = cam.astype(np.float32, copy=False)
    if (cam.shape[1], cam.shape[0]) != tuple(size):
        resized = cv2.resize(resized, size, interpolation=cv2.INTER_LINEAR)
    bgr = cv2.applyColorMap(np.uint8(np.clip(resized, 0, 1) * 255), cv2.COLORMAP_JET)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def render_heatmap(image: np.ndarray, cam: np.ndarray, opacity: float) -> np.ndarray:
    """The heatmap alone (opacity does not apply)."""
    return colorize(cam, (image.shape[1], image.shape[0]))


def render_overlay(image: np.ndarray, cam: np.ndarray, opacity: float) -> np.ndarray:
    """Heatmap blended over the image; opacity 0 shows the image, 1 the heatmap."""
    heat = colorize(cam, (image.shape[1], image.shape[0]))
    return cv2.addWeighted(image, 1.0 - opacity, heat, opacity, 0.0)


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
    """RGB uint8 → PNG bytes, encoded for speed (PNG_OPTIONS)."""
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), PNG_OPTIONS)
    if not ok:
        raise RuntimeError("OpenCV could not encode the Grad-CAM picture as PNG")
    return encoded.tobytes()


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
    """Explains a Predictor's decisions; on torch one explanation at a time (CAM hooks are per
    model), on ONNX Runtime concurrently (no hooks).

    The answer that comes with the CAM is classify's, from the same forward pass: on torch the
    explanation's own (every served view in one batch, hooks on the model); on ONNX Runtime
    classify's own call, which also returns the plain view's feature map, and torch computes
    only the gradient through the pooling and head.
    """

    def __init__(self, predictor: Predictor, max_side: int = DEFAULT_MAX_SIDE):
        self.predictor = predictor
        self.max_side = int(max_side)
        self._lock = threading.Lock()

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode an upload only as large as the rendering and the model need (JPEG DCT
        scaling: the long side stays >= max_side, the short side >= the model's decode side)."""
        return decode_image(
            data,
            max_pixels=max_pixels,
            min_short_side=self.predictor.decode_side,
            min_long_side=self.max_side,
        )

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
        predictor = self.predictor
        tensor = predictor.to_tensor([image])
        if predictor.backend == "onnx":
            # classify's own call (every served view) with the plain view's feature map; the
            # CAM of the class that answer ranks first (or the one asked for) from the head alone
            logits, features, feature_map = predictor.engine.with_feature_map(tensor)
            targets = [int(np.argmax(logits[0])) if index is None else index]
            cams = cam_from_feature_map(predictor.model, feature_map, targets)
        else:
            # torch alone: the served views in one batch, the answer averages them and the CAM
            # explains the plain view for the class that answer ranks first (or the one asked for)
            views = tta_views(tensor, predictor.checkpoint.tta)
            with self._lock:
                result = cam_pass(predictor.model, torch.cat(views),
                                  None if index is None else [index], views=len(views))  # fmt: skip
            logits, features = result.logits, result.features
            targets, cams = result.targets, result.grid_cams
        prediction = predictor.predictions([predictor.assess(image)], logits, features,
                                           [image])[0]  # fmt: skip
        index = targets[0]
        grid = predictor.model.feature_grid()
        side = (predictor.img_size, predictor.img_size)
        cam = np.clip(upsample_cam(cams[0], side, grid), 0.0, 1.0)
        shown = shrink_image(image, self.max_side, "long")
        shown_cam = upsample_cam(cams[0], (shown.shape[1], shown.shape[0]), grid, side)
        picture = render(shown, np.clip(shown_cam, 0.0, 1.0), mode, float(opacity))
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
