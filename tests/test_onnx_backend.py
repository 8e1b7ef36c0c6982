"""The ONNX Runtime backend: same answers as torch (probabilities and trust fields), cached
exports keyed by the model's content, and backend choice."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dermanet.classes import CLASS_NAMES
from dermanet.data.synthetic import draw_lesion
from dermanet.inference import Predictor, load_checkpoint, save_checkpoint
from dermanet.inference.features import extract_features
from dermanet.inference.onnx_backend import ONNX_CACHE_ENV, OnnxEngine, onnx_file
from dermanet.inference.predictor import resolve_backend
from dermanet.models import create_model
from dermanet.trust.fit import fit_trust_statistics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dermanet_tiny.yaml"
SHIPPED = ROOT / "weights" / "default.pt"


@pytest.fixture(autouse=True)
def onnx_cache(tmp_path: Path, monkeypatch) -> Path:
    """Exports go to this test's own folder, never to the shared temp cache."""
    folder = tmp_path / "onnx-cache"
    monkeypatch.setenv(ONNX_CACHE_ENV, str(folder))
    return folder


def _with_trust(path: Path, out: Path, images: list[np.ndarray], labels: np.ndarray) -> Path:
    """The checkpoint again, with gate and set statistics fitted on half the images each
    (as export does: OOD on 'train' features with its threshold on 'val', sets on 'val')."""
    loaded = load_checkpoint(path)
    features, logits = extract_features(Predictor(loaded), images)
    half = len(images) // 2
    trust = fit_trust_statistics(features[:half], labels[:half], features[half:],
                                 logits[half:], labels[half:], loaded.temperature)  # fmt: skip
    return save_checkpoint(out, loaded.model, img_size=loaded.img_size, mean=loaded.mean,
                           std=loaded.std, temperature=loaded.temperature, trust=trust)  # fmt: skip


def _odd_ones(rng: np.random.Generator) -> list[np.ndarray]:
    """Pictures the gate should refuse: grey, noise, a dark frame."""
    return [
        np.full((200, 150, 3), 128, np.uint8),
        rng.integers(0, 255, (180, 240, 3), dtype=np.uint8),
        np.full((160, 160, 3), 8, np.uint8),
    ]


def assert_same_answers(torch_predictor: Predictor, onnx_predictor: Predictor, images) -> None:
    assert (torch_predictor.backend, onnx_predictor.backend) == ("torch", "onnx")
    expected = torch_predictor.predict_batch(images)
    got = onnx_predictor.predict_batch(images)
    for i, (a, b) in enumerate(zip(expected, got, strict=True)):
        np.testing.assert_allclose(
            [b.probabilities[c] for c in CLASS_NAMES],
            [a.probabilities[c] for c in CLASS_NAMES],
            atol=1e-4,
            err_msg=f"image {i}",
        )
        assert b.top_class == a.top_class and b.prediction_set == a.prediction_set, i
        assert b.gate["accepted"] == a.gate["accepted"] and b.gate["reasons"] == a.gate["reasons"]
        if a.gate["ood_score"] is not None:
            assert b.gate["ood_score"] == pytest.approx(a.gate["ood_score"], rel=1e-3, abs=1e-3)
        assert b.to_dict()["traffic_light"] == a.to_dict()["traffic_light"], i
    if len(images) > 3:  # the comparison covers both verdicts of the gate
        assert {p.accepted for p in expected} == {True, False}


def test_onnx_answers_equal_torch_on_synthetic_lesions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "tiny.pt", create_model(TINY), img_size=64)
    rng = np.random.default_rng(0)
    names = [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(64)]
    images = [draw_lesion(name, 96, rng)[0] for name in names]
    labels = np.array([CLASS_NAMES.index(n) for n in names])
    trusted = _with_trust(path, tmp_path / "trusted.pt", images[:48], labels[:48])
    loaded = load_checkpoint(trusted)
    assert set(loaded.trust) == {"ood", "conformal"}
    test_images = images[48:] + _odd_ones(rng)
    assert_same_answers(Predictor(loaded), Predictor(loaded, backend="onnx"), test_images)
    assert_same_answers(Predictor(loaded), Predictor(loaded, backend="onnx"), test_images[:1])


@pytest.mark.sample
def test_onnx_answers_equal_torch_on_derm_sample(derm_sample: Path, tmp_path: Path) -> None:
    """The shipped model on real dermoscopy images (gate statistics fitted on 96 of them)."""
    meta = pd.read_csv(derm_sample / "metadata.csv").sample(n=128, random_state=3)
    torch_predictor = Predictor(load_checkpoint(SHIPPED))
    images = [torch_predictor.decode((derm_sample / "images" / f"{i}.jpg").read_bytes())
              for i in meta["image"]]  # fmt: skip
    labels = np.array([CLASS_NAMES.index(label) for label in meta["label"]])
    trusted = load_checkpoint(_with_trust(SHIPPED, tmp_path / "trusted.pt", images[:96],
                                          labels[:96]))  # fmt: skip
    test_images = images[96:] + _odd_ones(np.random.default_rng(1))
    assert_same_answers(Predictor(trusted), Predictor(trusted, backend="onnx"), test_images)


def test_exports_are_cached_by_model_content(tmp_path: Path, onnx_cache: Path) -> None:
    torch.manual_seed(0)
    first = load_checkpoint(save_checkpoint(tmp_path / "a.pt", create_model(TINY), img_size=48))
    path = onnx_file(first)
    assert path.parent == onnx_cache and path.suffix == ".onnx"
    stamp = path.stat().st_mtime_ns
    again = load_checkpoint(save_checkpoint(tmp_path / "b.pt", first.model, img_size=48))
    assert onnx_file(again) == path and path.stat().st_mtime_ns == stamp  # same weights: reused
    torch.manual_seed(1)
    other = load_checkpoint(save_checkpoint(tmp_path / "c.pt", create_model(TINY), img_size=48))
    assert onnx_file(other) != path  # other weights: their own export
    bigger = load_checkpoint(save_checkpoint(tmp_path / "d.pt", first.model, img_size=64))
    assert onnx_file(bigger) != path  # other input size: its own export
    path.write_bytes(b"damaged")
    engine = OnnxEngine.for_checkpoint(first)  # a broken cache file is exported again
    logits, features = engine(torch.zeros(3, 3, 48, 48))
    assert logits.shape == (3, len(CLASS_NAMES)) and features.shape[0] == 3
    assert sorted(p.name for p in onnx_cache.iterdir() if p.name.startswith(".")) == []


def test_backend_choice(monkeypatch) -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "onnx"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown inference backend 'tensorrt'"):
        resolve_backend("tensorrt", torch.device("cpu"))
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_backend("onnx", torch.device("cuda"))
    assert os.environ[ONNX_CACHE_ENV]  # the autouse fixture keeps exports out of /tmp


def test_serve_settings_choose_the_backend() -> None:
    """`backend` in the Serve config: auto by default (ONNX Runtime on a CPU), checked early,
    and declared in both Serve configs."""
    import yaml

    from dermanet.serving.settings import ServeSettings

    assert ServeSettings().backend == "auto"
    assert ServeSettings.from_mapping({"backend": "torch"}).backend == "torch"
    assert ServeSettings.from_env({"DERMANET_SERVE_BACKEND": "onnx"}).backend == "onnx"
    with pytest.raises(ValueError, match="backend='tensorrt'"):
        ServeSettings.from_mapping({"backend": "tensorrt"})
    for config in ("serve/config.yaml", "deploy/serve-cluster.yaml"):
        args = yaml.safe_load((ROOT / config).read_text())["applications"][0]["args"]
        assert args["backend"] == "auto", config


def test_gradcam_stays_on_torch_with_the_onnx_backend(tmp_path: Path) -> None:
    """An explainer over an ONNX-backed predictor still gets gradients (torch model), and its
    answer is the classify answer."""
    from dermanet.inference import GradCamExplainer

    torch.manual_seed(0)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "t.pt", create_model(TINY), img_size=64))
    predictor = Predictor(loaded, backend="onnx")
    image = draw_lesion("MEL", 120, np.random.default_rng(5))[0]
    result = GradCamExplainer(predictor, max_side=96).explain(image)
    assert result.png.startswith(b"\x89PNG") and result.cam.shape == (64, 64)
    assert result.cam.min() >= 0.0 and result.cam.max() <= 1.0 and result.cam.max() > 0.5
    expected = predictor.predict(image).probabilities
    assert result.prediction.probabilities == pytest.approx(expected, abs=1e-4)
