"""Preprocessing at the speed of decode: JPEGs decoded towards the model's size, one resize,
normalisation on the batch; the answers stay those of the full-size path on real images."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermanet.classes import CLASS_NAMES
from dermanet.data.images import decode_image
from dermanet.data.transforms import eval_transform, to_model_input
from dermanet.inference import Predictor, load_checkpoint
from dermanet.inference.tta import tta_views

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "default.pt"
TOLERANCE = 0.02  # largest allowed change of any class probability


def full_size_probabilities(predictor: Predictor, data: bytes) -> np.ndarray:
    """The path before this change: full decode, albumentations' eval transform per image
    (and the checkpoint's served views, averaged as the server does)."""
    loaded = predictor.checkpoint
    transform = eval_transform(
        loaded.img_size, loaded.mean, loaded.std, color_constancy=loaded.color_constancy
    )
    x = torch.from_numpy(to_model_input(transform, decode_image(data)))[None]
    with torch.inference_mode():
        views = [loaded.model(view).logits for view in tta_views(x, loaded.tta)]
    return predictor.calibrated(torch.stack(views).mean(0).numpy())[0]


@pytest.fixture(scope="module")
def uploads(derm_sample: Path) -> list[tuple[str, bytes]]:
    """Real derm-sample JPEGs of every size class, and some re-encoded at phone size."""
    root = derm_sample
    meta = pd.read_csv(root / "metadata.csv")
    meta["size"] = meta["width"].astype(str) + "x" + meta["height"].astype(str)
    picked = pd.concat(
        [
            meta[meta["size"] == "200x150"].sample(12, random_state=0),
            meta[meta["size"] == "256x256"].sample(8, random_state=0),
            meta[meta["size"] == "341x256"].sample(8, random_state=0),
            meta[meta["width"] >= 360].sample(6, random_state=0),
        ]
    )
    uploads = [(f"{i} ({s})", (root / "images" / f"{i}.jpg").read_bytes())
               for i, s in zip(picked["image"], picked["size"], strict=True)]  # fmt: skip
    for name, data in uploads[-8:]:  # the biggest ones again, as a camera would send them
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).resize((1600, 1200)).save(buffer, "JPEG", quality=92)
        uploads.append((f"{name} at 1600x1200", buffer.getvalue()))
    return uploads


@pytest.mark.sample
@pytest.mark.parametrize("color_constancy", ["none", "shades_of_gray"])
def test_served_probabilities_stay_within_tolerance(uploads, color_constancy) -> None:
    loaded = dataclasses.replace(load_checkpoint(SHIPPED), color_constancy=color_constancy)
    predictor = Predictor(loaded)
    worst, where = 0.0, ""
    for name, data in uploads:
        image = predictor.decode(data)
        served = predictor.predict(image)
        new = np.array([served.probabilities[c] for c in CLASS_NAMES])
        gap = float(np.abs(new - full_size_probabilities(predictor, data)).max())
        if gap > worst:
            worst, where = gap, name
    print(f"largest probability change ({color_constancy}): {worst:.4f} on {where}")
    assert worst <= TOLERANCE, f"{where}: a probability moved by {worst:.4f}"


@pytest.mark.sample
def test_big_uploads_are_decoded_small(uploads) -> None:
    predictor = Predictor(load_checkpoint(SHIPPED))
    _, data = uploads[-1]
    assert min(decode_image(data).shape[:2]) == 1200
    image = predictor.decode(data)
    # JPEG's reduced-size decoding: the smallest DCT scale (1/2, 1/4, 1/8) that keeps the short
    # side at least the model's decode side (2x its input): 1200 -> 300 px for a 128 px model,
    # 600 px for a 160 px one
    side = predictor.decode_side
    expected = min(1200 // scale for scale in (1, 2, 4, 8) if 1200 // scale >= side)
    assert min(image.shape[:2]) == expected < 1200
    assert predictor.predict_bytes(data).probabilities == predictor.predict(image).probabilities


def test_shades_of_gray_is_exactly_the_per_pixel_scaling() -> None:
    """The lookup table gives the very pixels of scaling every pixel by the channel gain, and
    the illuminant is the textbook p-norm mean (OpenCV's sums, numpy's formula)."""
    from dermanet.data.synthetic import draw_lesion
    from dermanet.data.transforms import shades_of_gray, shades_of_gray_illuminant

    rng = np.random.default_rng(0)
    images = [draw_lesion(name, 150, rng)[0] for name in CLASS_NAMES]
    images += [rng.integers(0, 256, (97, 131, 3), dtype=np.uint8), np.zeros((8, 8, 3), np.uint8),
               np.full((1, 5, 3), 200, np.uint8)]  # fmt: skip
    for image in images:
        pixels = image.astype(np.float64)
        moments = np.mean(np.power(pixels[::2, ::2] / 255.0, 6.0), axis=(0, 1))
        textbook = np.power(moments, 1.0 / 6.0)
        textbook = textbook / max(float(np.linalg.norm(textbook)), 1e-6)
        illuminant = shades_of_gray_illuminant(image)
        np.testing.assert_allclose(illuminant, textbook, rtol=1e-5, atol=1e-9)
        gain = 1.0 / (illuminant.astype(np.float32) * np.float32(np.sqrt(3.0)) + np.float32(1e-6))
        expected = np.clip(pixels.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(shades_of_gray(image), expected)


@pytest.mark.parametrize("color_constancy", ["none", "shades_of_gray"])
def test_evaluation_batches_are_the_served_pixels(color_constancy: str) -> None:
    """Validation during training and jobs/evaluate.py score exactly the pixels the server
    feeds its model: the same reduced-scale JPEG decoding and resize (a 1100x800 upload decodes
    at 1/4 scale for a 64 px model; full-size decoding gives other pixels)."""
    from dermanet.data.pipelines import decode_transform_batch
    from dermanet.data.synthetic import draw_lesion
    from dermanet.inference.predictor import Preprocessing

    rng = np.random.default_rng(3)
    uploads = []
    for size in ((1100, 800), (300, 200)):
        lesion, _ = draw_lesion("MEL", 512, rng)
        buffer = io.BytesIO()
        Image.fromarray(lesion).resize(size).save(buffer, "JPEG", quality=90)
        uploads.append(buffer.getvalue())
    batch = {
        "jpeg": np.array(uploads, dtype=object),
        "label_index": np.array([0, 1]),
        "index": np.array([7, 8]),
    }
    out = decode_transform_batch(batch, "eval", 64, color_constancy)
    served = Preprocessing(64, color_constancy)
    for image, data in zip(out["image"], uploads, strict=True):
        expected = served.pixels(served.decode(data))
        np.testing.assert_array_equal(image, expected.transpose(2, 0, 1))
