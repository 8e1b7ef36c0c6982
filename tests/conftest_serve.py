"""Fixtures for inference, Grad-CAM and Serve tests (registered with `pytest_plugins`).

TEST FIXTURE, not training code: `synthetic_model` trains the tiny DermResNetSE for a few epochs
with a plain PyTorch loop on SYNTHETIC lesions planted at random places on a larger skin canvas,
so Grad-CAM has something real to localise. Real training is jobs/train.py (Ray Train).
`trusted` is the same model with trust statistics (OOD detector + conformal thresholds) fitted
on other planted SYNTHETIC canvases; real export fits them with jobs/evaluate.py --export.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dermanet.classes import CLASS_INDEX
from dermanet.data.images import read_image
from dermanet.data.synthetic import draw_lesion, generate_synthetic_dataset
from dermanet.data.transforms import eval_transform, to_model_input
from dermanet.inference import Predictor, load_checkpoint, save_checkpoint
from dermanet.inference.features import extract_features
from dermanet.models import DermResNetSE, create_model
from dermanet.paths import PROJECT_ROOT
from dermanet.trust.fit import fit_trust_statistics

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dermanet_tiny.yaml"
CANVAS = 128  # model input; the tiny net's last stage is a 4x4 grid with stride 32
TILE = 64  # synthetic lesion tiles are drawn at this size and planted on the canvas


def plant(tile: np.ndarray, lesion_xy: tuple[float, float], at_xy: tuple[float, float], rng):
    """Paste `tile` on a skin-coloured canvas so its lesion centre (px) lands on `at_xy` (px)."""
    border = np.concatenate([tile[0], tile[-1], tile[:, 0], tile[:, -1]]).astype(np.float32)
    canvas = np.median(border, axis=0) + rng.normal(0, 4, (CANVAS, CANVAS, 3))
    x0, y0 = (round(a - b) for a, b in zip(at_xy, lesion_xy, strict=True))
    sx, sy = max(0, -x0), max(0, -y0)
    ex, ey = min(TILE, CANVAS - x0), min(TILE, CANVAS - y0)
    canvas[y0 + sy : y0 + ey, x0 + sx : x0 + ex] = tile[sy:ey, sx:ex]
    return np.clip(canvas, 0, 255).astype(np.uint8)


@dataclass
class SyntheticTiles:
    """SYNTHETIC lesion tiles with their metadata (lesion_cx/cy/r as fractions of TILE)."""

    images: list[np.ndarray]
    meta: pd.DataFrame

    def lesion_px(self, i: int) -> tuple[float, float]:
        row = self.meta.iloc[i]
        return float(row.lesion_cx) * TILE, float(row.lesion_cy) * TILE


def synthetic_tiles(out: Path, num_images: int, seed: int) -> SyntheticTiles:
    meta = generate_synthetic_dataset(out, num_images=num_images, size=TILE, seed=seed)
    images = [read_image(out / "images" / f"{image_id}.jpg") for image_id in meta.image]
    return SyntheticTiles(images, meta)


def train_planted_model(tiles: SyntheticTiles, epochs: int = 6, seed: int = 0) -> DermResNetSE:
    """Plain PyTorch loop: each sample is a tile planted at a random place on the canvas."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    transform = eval_transform(CANVAS)
    labels = torch.tensor([CLASS_INDEX[label] for label in tiles.meta.label])
    model = create_model(TINY_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    n = len(tiles.images)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n - 31, 32):  # drop_last: BatchNorm dislikes tiny batches
            idx = order[start : start + 32]
            batch = []
            for i in idx:
                lx, ly = tiles.lesion_px(i)
                at = (rng.uniform(lx, CANVAS - TILE + lx), rng.uniform(ly, CANVAS - TILE + ly))
                batch.append(to_model_input(transform, plant(tiles.images[i], (lx, ly), at, rng)))
            logits = model(torch.from_numpy(np.stack(batch))).logits
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    optimizer.zero_grad()  # hand out a model without gradients (tests assert none appear)
    return model.eval()


def planted_images(tiles: SyntheticTiles, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Each tile planted once at a random place: (canvases, class indices)."""
    rng = np.random.default_rng(seed)
    images = []
    for i, tile in enumerate(tiles.images):
        lx, ly = tiles.lesion_px(i)
        at = (rng.uniform(lx, CANVAS - TILE + lx), rng.uniform(ly, CANVAS - TILE + ly))
        images.append(plant(tile, (lx, ly), at, rng))
    return images, np.array([CLASS_INDEX[label] for label in tiles.meta.label])


def fit_trust(
    checkpoint: Path,
    train: tuple[list[np.ndarray], np.ndarray],
    val: tuple[list[np.ndarray], np.ndarray],
) -> dict:
    """Trust statistics for a checkpoint, fitted as export does: OOD on train features (its
    threshold on val), conformal sets on val probabilities (the checkpoint's temperature)."""
    loaded = load_checkpoint(checkpoint)
    predictor = Predictor(loaded)
    train_features, _ = extract_features(predictor, train[0])
    val_features, val_logits = extract_features(predictor, val[0])
    return fit_trust_statistics(
        train_features, train[1], val_features, val_logits, val[1], loaded.temperature
    )


@pytest.fixture(scope="session")
def planting() -> SimpleNamespace:
    """The planting helpers, for test modules (importing this plugin module would bypass
    pytest's assertion rewriting)."""
    return SimpleNamespace(
        plant=plant,
        tiles=synthetic_tiles,
        planted=planted_images,
        fit_trust=fit_trust,
        encode=encode_image,
        canvas=CANVAS,
        tile=TILE,
        tiny_config=TINY_CONFIG,
    )


@pytest.fixture(scope="session")
def synthetic_train_tiles(tmp_path_factory: pytest.TempPathFactory) -> SyntheticTiles:
    """The SYNTHETIC tiles the planted model is trained on."""
    return synthetic_tiles(tmp_path_factory.mktemp("planted-train"), num_images=320, seed=1)


@pytest.fixture(scope="session")
def synthetic_model(synthetic_train_tiles: SyntheticTiles) -> DermResNetSE:
    """The tiny model trained on planted SYNTHETIC lesions (test fixture, ~30 s on 2 CPUs)."""
    return train_planted_model(synthetic_train_tiles)


@pytest.fixture(scope="session")
def model_registry(
    tmp_path_factory: pytest.TempPathFactory, synthetic_model, synthetic_train_tiles
) -> Path:
    """A registry folder: `default` (trained, 128 px, no trust statistics: quality checks
    only), `trusted` (the same weights with OOD + conformal statistics fitted on planted
    SYNTHETIC canvases, ~7 s) and `tiny-random` (untrained, 64 px)."""
    folder = tmp_path_factory.mktemp("registry")
    common = {
        "img_size": CANVAS,
        "metrics": {"note": "SYNTHETIC test fixture"},
        "provenance": {"data": "SYNTHETIC planted lesions"},
    }
    save_checkpoint(folder / "default.pt", synthetic_model, **common)
    val_tiles = synthetic_tiles(tmp_path_factory.mktemp("planted-val"), num_images=200, seed=2)
    trust = fit_trust(
        folder / "default.pt",
        planted_images(synthetic_train_tiles, seed=5),
        planted_images(val_tiles, seed=6),
    )
    save_checkpoint(folder / "trusted.pt", synthetic_model, trust=trust, **common)
    torch.manual_seed(1)
    save_checkpoint(folder / "tiny-random.pt", create_model(TINY_CONFIG), img_size=64)
    return folder


def encode_image(pixels: np.ndarray, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def not_dermoscopy() -> dict[str, bytes]:
    """Pictures that are not dermoscopy, as uploaded by mistake: a screenshot of
    the dashboard itself (docs/images/dashboard.png, made by the browser test), a photo that
    ships with scikit-learn, a blank image and a 24 px image of a SYNTHETIC lesion."""
    from sklearn.datasets import load_sample_images

    china = np.asarray(load_sample_images().images[0], dtype=np.uint8)
    tiny, _ = draw_lesion("MEL", 24, np.random.default_rng(0))
    screenshot = PROJECT_ROOT / "docs" / "images" / "dashboard.png"
    return {
        "screenshot": screenshot.read_bytes(),
        "photo": encode_image(china, "JPEG", quality=90),
        "blank": encode_image(np.full((300, 400, 3), 236, dtype=np.uint8)),
        "24px": encode_image(tiny),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def serve_account(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The test server's data folder and SQLite database (upgraded), with an admin account:
    `key` and `headers` (`Authorization: Bearer KEY`) for requests to /v1 routes."""
    from dermanet.serving.runner import private_account

    folder = tmp_path_factory.mktemp("serve-data")
    url, key = private_account(folder, "test-admin", "admin")
    return SimpleNamespace(
        key=key, headers={"Authorization": f"Bearer {key}"}, database_url=url, data_dir=folder
    )


@pytest.fixture(scope="session")
def serve_headers(serve_account: SimpleNamespace) -> dict[str, str]:
    """The test admin's `Authorization` header, for requests to the session's server."""
    return dict(serve_account.headers)


@pytest.fixture(scope="session")
def serve_url(model_registry: Path, serve_account: SimpleNamespace) -> Iterator[str]:
    """One private Ray + Serve per test session (port: $DERMANET_SERVE_PORT or a free one),
    on the `serve_account` database."""
    from dermanet.serving import ServeSettings
    from dermanet.serving.runner import start_local, stop_local

    settings = ServeSettings(
        database_url=serve_account.database_url,
        data_dir=str(serve_account.data_dir),
        model_dir=str(model_registry),
        max_body_bytes=2 * 1024 * 1024,
        max_image_pixels=4_000_000,
        max_batch_size=8,
        batch_wait_timeout_s=0.02,
    )
    port = int(os.environ.get("DERMANET_SERVE_PORT") or _free_port())
    temp_dir = tempfile.mkdtemp(prefix="drn-ray-", dir="/tmp")  # short: socket path limit
    try:
        yield start_local(settings, port=port, num_cpus=8, temp_dir=temp_dir)  # see ray_local
    finally:
        stop_local()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def similar_index(
    tmp_path_factory: pytest.TempPathFactory, model_registry: Path, synthetic_dir: Path, ray_local
) -> SimpleNamespace:
    """`default`'s similar-cases index in the session registry, built by
    jobs/build_index.py on Ray Data from the TRAIN split of a copy of the SYNTHETIC set in
    which one training image is truncated (left out, never fatal); 32 px thumbnails.

    Returns the index path, the catalogue (with splits and paths), the truncated image's id,
    the CSV and the job module."""
    import importlib.util

    from dermanet.data.sources import DataLocation, load_catalogue

    data = tmp_path_factory.mktemp("similar-data")
    shutil.copytree(synthetic_dir, data, dirs_exist_ok=True)
    csv = data / "metadata.csv"
    catalogue = load_catalogue(DataLocation(csv=str(csv), images=str(data / "images")))
    truncated = str(catalogue.loc[catalogue["split"] == "train", "image"].iloc[0])
    broken = Path(catalogue.set_index("image").loc[truncated, "path"])
    broken.write_bytes(broken.read_bytes()[:200])
    spec = importlib.util.spec_from_file_location(
        "build_index_job", PROJECT_ROOT / "jobs" / "build_index.py"
    )
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    code = job.main(
        ["--model", "default", "--model-dir", str(model_registry), "--csv", str(csv),
         "--images", str(data / "images"), "--thumbnails", "32", "--batch-size", "16",
         "--cpus-per-worker", "0.5", "--decode-cpus", "0.5"]
    )  # fmt: skip
    assert code == 0, "jobs/build_index.py failed on the SYNTHETIC catalogue"
    return SimpleNamespace(
        path=model_registry / "default.index.parquet",
        catalogue=catalogue,
        truncated=truncated,
        csv=csv,
        job=job,
    )
