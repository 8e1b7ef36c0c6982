"""jobs/predict.py (Ray Data batch inference) against the real server: the same answers.

One private Ray + Serve for the session (conftest_serve); the batch job runs in that Ray. The
model under test (`trusted`) carries trust statistics (OOD gate + conformal sets), so the gate
and set fields are compared for accepted and refused images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import load_job
from conftest_serve import encode_image
from PIL import Image

from dermanet.classes import CLASS_NAMES
from dermanet.inference import Predictor, load_checkpoint

pytest_plugins = ["conftest_serve"]
# Generous: the first test may also build the session's planted model and Serve (minutes on a
# loaded 2-core machine); a Ray hang still ends.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
predict_job = load_job("predict")

MODEL_ID = "trusted"
UNREADABLE = {"broken.jpg", "truncated.jpg"}
# The job and an in-process Predictor with the same backend give the same numbers (to float
# rounding). Serve picks its own backend: torch and ONNX Runtime differ by < 1e-6 in the
# probabilities (docs/benchmarks.md), far below what another decoder or preprocessing moves.
SAME = {"abs": 1e-6}
SERVED = {"abs": 1e-5}


def jpeg(pixels: np.ndarray) -> bytes:
    return encode_image(pixels, "JPEG", quality=92)


@pytest.fixture(scope="module")
def trust_model(model_registry: Path) -> Path:
    """The session registry's `trusted` model: OOD gate + conformal sets (conftest_serve)."""
    return model_registry / f"{MODEL_ID}.pt"


@pytest.fixture(scope="module")
def archive(tmp_path_factory, planting) -> Path:
    """A folder tree of lesions (JPEG, PNG with alpha, several sizes), pictures the gate should
    refuse (noise, a flat grey card), two unreadable files and files that are no images."""
    root = tmp_path_factory.mktemp("archive")
    deep = root / "2025" / "march"
    deep.mkdir(parents=True)
    tiles = planting.tiles(tmp_path_factory.mktemp("archive-tiles"), num_images=8, seed=11)
    rng = np.random.default_rng(11)
    for i, tile in enumerate(tiles.images):
        at = (planting.canvas / 2 + rng.uniform(-20, 20), planting.canvas / 2)
        picture = planting.plant(tile, tiles.lesion_px(i), at, rng)
        if i < 4:
            (root / f"lesion_{i}.jpg").write_bytes(jpeg(picture))
        elif i < 7:  # bigger than the model input: the server's resize path; the last one
            # big enough to be decoded at a reduced DCT scale (Predictor.decode, the server's):
            # a job that decoded otherwise would differ here
            size = (1100, 800) if i == 6 else (200 + 10 * i, 160)
            big = Image.fromarray(picture).resize(size, Image.BILINEAR)
            (deep / f"lesion_{i}.JPG").write_bytes(jpeg(np.asarray(big)))
        else:
            Image.fromarray(picture).convert("RGBA").save(deep / f"lesion_{i}.png")
    noise = rng.integers(0, 255, (96, 120, 3), dtype=np.uint8)
    (root / "noise.jpg").write_bytes(jpeg(noise))
    (deep / "grey_card.png").write_bytes(encode_image(np.full((90, 90, 3), 128, np.uint8)))
    (root / "broken.jpg").write_bytes(b"this is not an image")
    whole = (root / "lesion_0.jpg").read_bytes()
    (deep / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (root / "notes.txt").write_text("not an image, not listed")
    (root / ".hidden.jpg").write_bytes(whole)  # dot-files are skipped
    return root


def image_files(root: Path) -> list[Path]:
    return sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and not p.name.startswith(".")
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(serve_url: str, serve_headers: dict[str, str]):
    with httpx.Client(base_url=serve_url, headers=serve_headers, timeout=120) as c:
        yield c


def run_job(*args: str) -> int:
    return predict_job.main([str(a) for a in args])


# Two half-CPU workers with an explicit thread count: the rows must still equal the server's.
WORKERS = ["--num-workers", "2", "--cpus-per-worker", "0.5", "--decode-cpus", "0.5",
           "--threads-per-worker", "1"]  # fmt: skip


def test_rows_equal_classify_answers(client, trust_model, archive, tmp_path, caplog) -> None:
    out = tmp_path / "scores.parquet"
    caplog.set_level(logging.WARNING, logger="dermanet.inference.batch")
    code = run_job("--input", archive, "--output", out, "--model", MODEL_ID, "--model-dir",
                   trust_model.parent, "--batch-size", 4, "--embeddings", *WORKERS)  # fmt: skip
    assert code == 0
    table = pd.read_parquet(out)
    files = image_files(archive)
    assert table["path"].tolist() == [str(p) for p in files]  # recursive, in listing order
    assert table["image"].tolist() == [p.stem for p in files]
    assert (table["model_id"] == MODEL_ID).all()
    version = load_checkpoint(trust_model).version  # every row names the exact file scored
    assert (table["model_sha256"] == hashlib.sha256(trust_model.read_bytes()).hexdigest()).all()
    assert (table["model_sha256"] == version.sha256).all()
    assert (table["model_created"] == version.created).all()

    failed = table.loc[table["error"].notna()]
    assert sorted(Path(p).name for p in failed["path"]) == sorted(UNREADABLE)
    assert failed[[f"prob_{c}" for c in CLASS_NAMES]].isna().all().all()
    assert "not an image format" in failed.loc[failed["image"] == "broken", "error"].item()
    for path in failed["path"]:  # unreadable files are in the log too
        assert any(path in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)

    direct = Predictor(load_checkpoint(trust_model), backend="auto")  # the job's default
    scored = table.loc[table["error"].isna()]
    for row in scored.itertuples(index=False):
        data = Path(row.path).read_bytes()
        expected = direct.predict_bytes(data)
        probs = {c: getattr(row, f"prob_{c}") for c in CLASS_NAMES}
        assert probs == pytest.approx(expected.probabilities, **SAME), row.path
        np.testing.assert_allclose(row.embedding, expected.features, atol=1e-5)
        response = client.post("/v1/classify", params={"model": MODEL_ID},
                               files={"file": (Path(row.path).name, data)})  # fmt: skip
        assert response.status_code == 200, response.text
        body = response.json()
        assert probs == pytest.approx(body["probabilities"], **SERVED), row.path
        assert row.top_class == body["top_class"]
        assert row.top_probability == pytest.approx(body["top_probability"], **SERVED)
        assert row.traffic_light == body["traffic_light"]
        assert row.probabilities_trusted == body["probabilities_trusted"]
        for key in ("risk", "malignant", "benign"):
            value = getattr(row, key)
            assert (None if pd.isna(value) else value) == pytest.approx(body[key], **SERVED)
        gate = body["gate"]  # the model has OOD statistics: no "checks" note
        assert set(gate) == {"accepted", "reasons", "ood_score", "ood_threshold"}
        assert pd.isna(row.gate_checks)
        assert row.gate_accepted == gate["accepted"], row.path
        assert list(row.gate_reasons) == gate["reasons"]
        for key in ("ood_score", "ood_threshold"):  # from float32 features: 1e-4 relative
            value = getattr(row, f"gate_{key}")
            assert (None if pd.isna(value) else value) == pytest.approx(gate[key], rel=1e-4)
        assert list(row.prediction_set) == body["prediction_set"]
        assert row.set_coverage == pytest.approx(body["set_coverage"])
    # both sides of the gate were compared: refused images claim no risk
    accepted = scored["gate_accepted"].astype(bool)
    assert accepted.any() and not accepted.all()
    refused = scored.loc[~accepted]
    assert (refused["traffic_light"] == "unknown").all() and refused["risk"].isna().all()
    assert any("noise" in i or "grey_card" in i for i in refused["image"])
    embeddings = np.stack(scored["embedding"].to_numpy())
    assert embeddings.shape == (len(scored), direct.checkpoint.config.feature_dim)


def test_catalogue_csv_and_path_list(trust_model, archive, tmp_path) -> None:
    direct = Predictor(load_checkpoint(trust_model), backend="auto")  # the job's default
    # A plain catalogue: ids looked up under --images, labels carried into the output (CSV).
    catalogue = tmp_path / "catalogue.csv"
    pd.DataFrame({"image": ["lesion_1", "lesion_5", "lesion_7"], "label": ["MEL", "NV", "BCC"]}
                 ).to_csv(catalogue, index=False)  # fmt: skip
    out = tmp_path / "catalogue_scores.csv"
    code = run_job("--input", catalogue, "--images", archive, "--output", out, "--model",
                   trust_model, *WORKERS)  # fmt: skip
    assert code == 0
    table = pd.read_csv(out)
    assert table["image"].tolist() == ["lesion_1", "lesion_5", "lesion_7"]
    assert table["label"].tolist() == ["MEL", "NV", "BCC"]
    assert "embedding" not in table
    for row in table.itertuples(index=False):
        expected = direct.predict_bytes(Path(row.path).read_bytes())
        got = [getattr(row, f"prob_{c}") for c in CLASS_NAMES]
        np.testing.assert_allclose(got, list(expected.probabilities.values()), atol=SAME["abs"])
        assert json.loads(row.gate_reasons) == expected.gate["reasons"]  # lists as JSON text
        assert json.loads(row.prediction_set) == expected.prediction_set

    # A list of files (relative to the CSV), one of them missing: a row with the reason.
    listing = tmp_path / "files.csv"
    relative = [os.path.relpath(archive / "lesion_2.jpg", tmp_path), "gone/missing.jpg"]
    pd.DataFrame({"path": relative}).to_csv(listing, index=False)
    out = tmp_path / "listed.parquet"
    assert run_job("--input", listing, "--output", out, "--model", trust_model, *WORKERS) == 0
    table = pd.read_parquet(out)
    assert table["image"].tolist() == ["lesion_2", "missing"]
    assert table["path"].tolist() == [str(archive / "lesion_2.jpg"), str(tmp_path / relative[1])]
    assert pd.isna(table["error"].tolist()[0])
    assert "does not exist" in table["error"].tolist()[1]

    # A folder given as a URI (the s3:// / gs:// code path, on the local filesystem).
    deep = archive / "2025"
    out = tmp_path / "uri_scores.csv"
    assert run_job("--input", f"file://{deep}", "--output", out, "--model", trust_model,
                   *WORKERS) == 0  # fmt: skip
    table = pd.read_csv(out)
    assert table["path"].tolist() == [f"file://{p}" for p in image_files(deep)]
    assert table.loc[table["image"] == "truncated", "error"].str.contains("truncated").all()
    assert table.loc[table["image"] != "truncated", "error"].isna().all()


def test_refusals_and_overwrite(trust_model, archive, tmp_path, capsys) -> None:
    out = tmp_path / "one.parquet"
    out.write_bytes(b"earlier results")
    one = archive / "lesion_3.jpg"
    common = ["--input", one, "--model", trust_model]
    assert run_job(*common, "--output", out) == 2  # existing output
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"earlier results"
    assert run_job(*common, "--output", tmp_path / "scores.json") == 2
    assert ".parquet or .csv" in capsys.readouterr().err
    assert run_job("--input", one, "--model", "no-such-model", "--model-dir",
                   trust_model.parent, "--output", tmp_path / "x.csv") == 2  # fmt: skip
    assert "unknown model id 'no-such-model'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_job("--input", empty, "--model", trust_model, "--output", tmp_path / "y.csv") == 2
    assert "no images" in capsys.readouterr().err
    assert run_job(*common, "--output", tmp_path / "g.csv", "--use-gpu", "--backend", "onnx") == 2
    assert "onnx runs on the CPU" in capsys.readouterr().err
    assert run_job(*common, "--output", tmp_path / "z.csv", "--num-workers", "500") == 2
    assert "lower --num-workers" in capsys.readouterr().err  # would wait forever otherwise
    assert run_job(*common, "--output", out, "--overwrite", *WORKERS) == 0
    table = pd.read_parquet(out)
    assert table["image"].tolist() == ["lesion_3"] and table["error"].isna().all()
    assert not list(tmp_path.glob(".one.parquet.*"))  # no temporary file left behind
