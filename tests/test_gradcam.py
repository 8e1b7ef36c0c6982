"""Grad-CAM: it must point at the lesion, align with the input and render every mode."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from dermanet.classes import CLASS_INDEX
from dermanet.data.transforms import eval_transform, to_model_input
from dermanet.inference import GradCamExplainer, LoadedCheckpoint, Predictor, compute_cams, render
from dermanet.inference.gradcam import FeatureGrid, cam_pass, upsample_cam
from dermanet.inference.onnx_backend import ONNX_CACHE_ENV
from dermanet.models import ModelConfig, create_model

pytest_plugins = ["conftest_serve"]
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dermanet_tiny.yaml"

# Cell j of the tiny net's 4x4 last stage is centred on input pixel 32*j (see
# DermResNetSE.feature_grid):
# lesions are planted there, away from the image centre, in four different cells.
PLANT_AT = [(0.25, 0.5), (0.5, 0.25), (0.25, 0.25), (0.5, 0.5)]


def test_cam_peaks_inside_planted_lesions(synthetic_model, planting, tmp_path: Path) -> None:
    tiles = planting.tiles(tmp_path / "held-out", num_images=16, seed=99)  # unseen drawings
    plant, canvas_px, tile_px = planting.plant, planting.canvas, planting.tile
    transform = eval_transform(canvas_px)
    rng = np.random.default_rng(0)
    hits, misses = 0, []
    for i, row in enumerate(tiles.meta.itertuples()):
        for fx, fy in PLANT_AT:
            at = (fx * canvas_px, fy * canvas_px)
            image = plant(tiles.images[i], tiles.lesion_px(i), at, rng)
            x = torch.from_numpy(to_model_input(transform, image))[None]
            cam = compute_cams(synthetic_model, x, [CLASS_INDEX[row.label]])[0]
            py, px = np.unravel_index(int(cam.argmax()), cam.shape)
            distance = np.hypot(px / canvas_px - fx, py / canvas_px - fy)
            radius = row.lesion_r * tile_px / canvas_px
            inside = distance <= radius
            hits += inside
            if not inside:
                misses.append(f"{row.label} at {(fx, fy)}: peak {distance:.2f} > r {radius:.2f}")
    # A random peak would land inside the lesion ~5 % of the time.
    print(f"CAM peak inside the planted lesion in {hits}/{len(tiles.meta) * len(PLANT_AT)} cases")
    assert hits >= 0.7 * len(tiles.meta) * len(PLANT_AT), misses


def test_one_pass_gives_the_models_logits_and_features(synthetic_model) -> None:
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        expected = synthetic_model(x)
    result = cam_pass(synthetic_model, x, [0, 4, 7])
    np.testing.assert_allclose(result.logits, expected.logits.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(result.features, expected.features.numpy(), atol=1e-5, rtol=1e-5)
    assert result.targets == [0, 4, 7] and result.grid_cams.shape == (3, 4, 4)
    assert cam_pass(synthetic_model, x).targets == expected.logits.argmax(1).tolist()


class _LibraryCAM(GradCAM):
    """pytorch-grad-cam's GradCAM at grid resolution: the reference our one-pass CAM must equal."""

    def get_target_width_height(self, input_tensor: torch.Tensor) -> None:
        return None


class _Explainable(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.explainable_logits(x)


def test_cam_equals_pytorch_grad_cam(synthetic_model) -> None:
    x = torch.randn(4, 3, 128, 128)
    targets = [1, 4, 5, 7]
    with _LibraryCAM(_Explainable(synthetic_model).eval(), [synthetic_model.cam_layer]) as cam:
        reference = cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    synthetic_model.zero_grad(set_to_none=True)  # the library's backward filled every .grad
    ours = cam_pass(synthetic_model, x, targets).grid_cams
    np.testing.assert_allclose(ours, np.nan_to_num(reference), atol=1e-4)


def test_explanation_is_one_forward_and_a_short_backward(synthetic_model) -> None:
    """Nothing computed twice: one pass through the network; gradients stop at the last
    stage (no weight gets a .grad); the answer equals what classify gives for the image."""
    checkpoint = LoadedCheckpoint(synthetic_model, synthetic_model.config, [], 128,
                                  (0.5,) * 3, (0.25,) * 3)  # fmt: skip
    predictor = Predictor(checkpoint)
    explainer = GradCamExplainer(predictor, max_side=100)
    image = np.random.default_rng(3).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    calls = []
    handle = synthetic_model.stem.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = explainer.explain(image, target="NV")
    finally:
        handle.remove()
    assert len(calls) == 1
    assert all(p.grad is None for p in synthetic_model.parameters())
    expected = predictor.predict(image)
    assert result.prediction.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    assert result.prediction.gate == expected.gate
    assert result.target_probability == result.prediction.probabilities["NV"]


def test_explanation_answers_like_classify_with_served_views(synthetic_model) -> None:
    """A model served with flips: Grad-CAM's answer is classify's (the views' average) and, with
    no target asked for, the CAM explains the class that answer ranks first; the four views go
    through the network in one forward pass."""
    checkpoint = LoadedCheckpoint(synthetic_model, synthetic_model.config, [], 128,
                                  (0.5,) * 3, (0.25,) * 3, tta="flips")  # fmt: skip
    predictor = Predictor(checkpoint)
    explainer = GradCamExplainer(predictor, max_side=100)
    images = [np.random.default_rng(seed).integers(0, 255, (150, 200, 3), dtype=np.uint8)
              for seed in range(3)]  # fmt: skip
    calls = []
    handle = synthetic_model.stem.register_forward_hook(lambda *_: calls.append(1))
    try:
        results = [explainer.explain(image) for image in images]
    finally:
        handle.remove()
    assert len(calls) == len(images)  # one forward pass per explanation, its views batched
    for image, result in zip(images, results, strict=True):
        expected = predictor.predict(image)
        assert result.prediction.probabilities == pytest.approx(expected.probabilities, abs=1e-5)
        assert result.target_class == expected.top_class
        single = Predictor(dataclasses.replace(checkpoint, tta="none")).predict(image)
        assert single.probabilities != pytest.approx(expected.probabilities, abs=1e-5)


@pytest.mark.parametrize("tta", ["flips", "none"])
def test_on_onnx_the_cam_comes_from_classifys_own_call(
    synthetic_model, tmp_path: Path, monkeypatch, tta: str
) -> None:
    """On ONNX the answer is the ONNX predictor's own (every served view, in ONNX Runtime), the
    feature map comes from that call and torch never runs the backbone: the CAM equals torch's
    Grad-CAM of the plain view for that answer's top class (and for a class asked for)."""
    monkeypatch.setenv(ONNX_CACHE_ENV, str(tmp_path / "onnx-cache"))
    checkpoint = LoadedCheckpoint(synthetic_model, synthetic_model.config, [], 128,
                                  (0.5,) * 3, (0.25,) * 3, tta=tta)  # fmt: skip
    predictor = Predictor(checkpoint, backend="onnx")
    explainer = GradCamExplainer(predictor, max_side=100)
    image = np.random.default_rng(5).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    batches = []
    handle = synthetic_model.stem.register_forward_hook(
        lambda _module, inputs, _output: batches.append(len(inputs[0]))
    )
    try:
        result = explainer.explain(image)
        asked = explainer.explain(image, target="VASC")
    finally:
        handle.remove()
    assert batches == []  # ONNX Runtime answered and gave the map; torch ran the head only
    expected = predictor.predict(image)
    assert result.prediction.probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    assert result.target_class == expected.top_class and asked.target_class == "VASC"
    grid = synthetic_model.feature_grid()
    for explanation in (result, asked):
        plain = cam_pass(
            synthetic_model, predictor.to_tensor([image]), [CLASS_INDEX[explanation.target_class]]
        )
        cam = np.clip(upsample_cam(plain.grid_cams[0], (128, 128), grid), 0.0, 1.0)
        np.testing.assert_allclose(explanation.cam, cam, atol=1e-4)
        assert explanation.cam.max() == pytest.approx(1.0, abs=1e-3)  # not an empty map


def test_feature_grid_and_aligned_upsampling() -> None:
    grid = create_model(TINY_CONFIG).feature_grid()
    assert grid == FeatureGrid(stride=32.0, offset=0.0)
    cam = np.zeros((4, 4), np.float32)
    cam[2, 1] = 1.0  # cell centred on input pixel (x=32, y=64)
    up = upsample_cam(cam, (128, 128), grid)
    assert np.unravel_index(int(up.argmax()), up.shape) == (64, 32)


@pytest.fixture(scope="module")
def explainer() -> GradCamExplainer:
    model = create_model(TINY_CONFIG).eval()
    checkpoint = LoadedCheckpoint(
        model, ModelConfig.from_yaml(TINY_CONFIG), [], 64, (0.5,) * 3, (0.25,) * 3
    )
    return GradCamExplainer(Predictor(checkpoint), max_side=100)


@pytest.mark.parametrize(
    ("mode", "width"), [("overlay", 100), ("heatmap", 100), ("side_by_side", 200)]
)
def test_render_modes_give_pngs(explainer: GradCamExplainer, mode: str, width: int) -> None:
    image = np.random.default_rng(0).integers(0, 255, (150, 300, 3), dtype=np.uint8)
    result = explainer.explain(image, target="MEL", mode=mode, opacity=0.3)
    png = Image.open(io.BytesIO(result.png))
    assert png.format == "PNG" and png.mode == "RGB"
    assert png.size == (width, 50)  # downscaled to max_side 100 (side-by-side doubles it)
    assert result.cam.shape == (64, 64) and 0 <= result.cam.min() <= result.cam.max() <= 1
    assert result.target_class == "MEL"
    assert result.target_probability == result.prediction.probabilities["MEL"]


def test_opacity_blends_image_and_heatmap() -> None:
    image = np.full((8, 8, 3), 200, np.uint8)
    cam = np.ones((4, 4), np.float32)
    assert np.array_equal(render(image, cam, "overlay", 0.0), image)
    assert np.array_equal(render(image, cam, "overlay", 1.0), render(image, cam, "heatmap", 0.0))
    with pytest.raises(ValueError, match="opacity"):
        render(image, cam, "overlay", 1.5)
    with pytest.raises(ValueError, match="display mode"):
        render(image, cam, "sepia", 0.5)


def test_default_target_is_the_predicted_class(explainer: GradCamExplainer) -> None:
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    result = explainer.explain(image)
    assert result.target_class == result.prediction.top_class
