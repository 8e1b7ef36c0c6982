"""Similar confirmed cases: the index, its build job and POST /v1/similar.

The index format and search are checked without Ray; the build runs jobs/build_index.py on
Ray Data over a SYNTHETIC catalogue (one training image truncated on purpose), and the
endpoint is the session's real Ray Serve (conftest_serve) answering from that index.
"""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dermanet.classes import CLASS_NAMES
from dermanet.inference import Predictor, load_checkpoint
from dermanet.inference.similar import (
    MAX_K,
    IndexCache,
    IndexMismatchError,
    IndexMissingError,
    IndexUnreadableError,
    SimilarityIndex,
    build_command,
    file_sha256,
    index_path,
    read_index_metadata,
    write_index,
)

pytest_plugins = ["conftest_serve"]

SHARDS_PROVENANCE = {"settings": {"shards": "/data/derm shards", "csv": None}}


def small_index(tmp_path: Path, labels: list[str], dim: int = 16, seed: int = 0):
    """A model file (any bytes: only its SHA-256 matters here) and an index of random rows."""
    rng = np.random.default_rng(seed)
    model = tmp_path / "m.pt"
    model.write_bytes(rng.bytes(1000))
    features = rng.normal(size=(len(labels), dim)).astype(np.float32)
    table = pd.DataFrame(
        {
            "image": [f"IMG_{i:04d}" for i in range(len(labels))],
            "label": labels,
            "lesion_id": [f"LES_{i // 2:04d}" for i in range(len(labels))],
        }
    )
    thumbs = [bytes([i % 256]) * 3 for i in range(len(labels))]
    path = write_index(index_path(model), model, table, features, thumbs, extra={"split": "train"})
    return model, path, features


@pytest.mark.timeout(60)
def test_index_round_trip_and_exact_search(tmp_path: Path) -> None:
    labels = [CLASS_NAMES[i % 8] for i in range(60)]
    model, path, features = small_index(tmp_path, labels)
    assert path == tmp_path / "m.index.parquet"
    meta = read_index_metadata(path)
    assert meta["model_sha256"] == file_sha256(model) and meta["rows"] == 60
    assert meta["split"] == "train" and meta["feature_dim"] == 16
    assert pq.read_schema(path).field("feature").type.value_type == "halffloat"
    index = SimilarityIndex(path, model)
    assert len(index) == 60 and index.thumbnails[3] == bytes([3]) * 3

    # brute force over the stored (float16, unit-length) rows agrees with the search
    stored = features / np.linalg.norm(features, axis=1, keepdims=True)
    stored = stored.astype(np.float16).astype(np.float32)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    queries = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    rows, distances = index.search(queries, 7)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    expected = np.argsort(-(q @ stored.T), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(rows, expected)
    assert (np.diff(distances, axis=1) >= 0).all()

    # a stored image finds itself first; k is clipped to the index
    cases = index.similar(features[11] * 3.0, k=500)
    assert len(cases.neighbours) == 60 and cases.neighbours[0].image == "IMG_0011"
    assert cases.neighbours[0].distance < 1e-3 and cases.neighbours[0].label == labels[11]
    answer = cases.to_dict()
    assert answer["k"] == 60 and answer["vote"] == "class-balanced"
    assert set(answer["knn_probabilities"]) == set(CLASS_NAMES)
    assert sum(answer["knn_probabilities"].values()) == pytest.approx(1.0)
    assert answer["neighbours"][0]["thumbnail"] == "CwsL"  # base64 of bytes([11]) * 3


@pytest.mark.timeout(60)
def test_vote_balances_the_classes(tmp_path: Path) -> None:
    """NV is 90 % of this index: three NV neighbours and one MEL vote MEL when balanced."""
    labels = ["NV"] * 18 + ["MEL"] * 2
    _, path, _ = small_index(tmp_path, labels)
    index = SimilarityIndex(path)
    rows = np.array([[0, 1, 2, 18]])
    balanced = index.vote(rows)[0]
    majority = index.vote(rows, balanced=False)[0]
    mel, nv = CLASS_NAMES.index("MEL"), CLASS_NAMES.index("NV")
    assert majority[nv] == pytest.approx(0.75) and majority[mel] == pytest.approx(0.25)
    # votes / class share: NV 3 / 0.9, MEL 1 / 0.1
    assert balanced[mel] == pytest.approx(10 / (10 + 3 / 0.9))
    assert balanced.sum() == pytest.approx(1.0) and balanced.argmax() == mel


@pytest.mark.timeout(60)
def test_index_cache_refuses_missing_stale_and_broken_indexes(tmp_path: Path) -> None:
    labels = [CLASS_NAMES[i % 8] for i in range(24)]
    model, path, features = small_index(tmp_path, labels)
    cache = IndexCache(max_entries=2)
    first = cache.get(model, SHARDS_PROVENANCE)
    assert cache.get(model, SHARDS_PROVENANCE) is first  # loaded once

    # a rebuilt index file is re-read
    table = pd.DataFrame({"image": ["A"], "label": ["MEL"], "lesion_id": ["A"]})
    write_index(path, model, table, features[:1])
    assert len(cache.get(model)) == 1

    # a retrained model file: the index is refused with the exact rebuild command
    model.write_bytes(b"another model")
    with pytest.raises(IndexMismatchError) as mismatch:
        cache.get(model, SHARDS_PROVENANCE)
    command = f"python jobs/build_index.py --model {model} --shards '/data/derm shards'"
    assert command in str(mismatch.value) and "another SHA-256" in str(mismatch.value)

    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(IndexUnreadableError, match=r"cannot be read .* rebuild it: python jobs"):
        cache.get(model, SHARDS_PROVENANCE)

    path.unlink()
    with pytest.raises(IndexMissingError) as missing:
        cache.get(model, {"settings": {"csv": "meta.csv", "images": "imgs"}})
    assert "has no similar-cases index (m.index.parquet beside the model)" in str(missing.value)
    assert "--model " + str(model) + " --csv meta.csv --images imgs" in str(missing.value)
    assert "--shards DIR (the model's training data" in build_command(model, {})


# --- the build job (Ray Data) -------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(1200)  # first Ray test: also trains the registry fixture, starts Ray
def test_build_index_job(similar_index, model_registry: Path) -> None:
    """Rows = the readable TRAIN images; features = the served model's; thumbnails = JPEGs."""
    built = similar_index
    index = SimilarityIndex(built.path, model_registry / "default.pt")
    train = built.catalogue.loc[built.catalogue["split"] == "train"]
    assert built.truncated in set(train["image"])
    assert set(index.images) == set(train["image"]) - {built.truncated}
    meta = read_index_metadata(built.path)
    assert meta["split"] == "train" and meta["thumbnail_px"] == 32 and meta["left_out"] == 1
    assert meta["rows"] == len(index)
    assert meta["model_id"] == "default" and meta["data"].startswith("catalogue ")
    by_id = train.set_index("image")
    for row, image in enumerate(index.images[:5]):
        assert CLASS_NAMES[index.labels[row]] == by_id.loc[image, "label"]
        assert index.lesions[row] == by_id.loc[image, "lesion_id"]
        thumb = Image.open(io.BytesIO(index.thumbnails[row]))
        assert thumb.format == "JPEG" and thumb.size == (32, 32)

    # the stored feature is the served model's feature of the same file, decoded as the server
    # decodes a /v1/similar query (float16 rounding)
    predictor = Predictor(load_checkpoint(model_registry / "default.pt"))
    images = [predictor.decode(Path(by_id.loc[i, "path"]).read_bytes()) for i in index.images[:6]]
    _, served = predictor.forward(images)
    served /= np.linalg.norm(served, axis=1, keepdims=True)
    np.testing.assert_allclose(index.features[:6], served, atol=2e-3)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_build_index_refuses_the_test_split_and_bad_input(
    similar_index, model_registry: Path, capsys
) -> None:
    job = similar_index.job
    data = ["--csv", str(similar_index.csv), "--images", str(similar_index.csv.parent / "images")]
    with pytest.raises(SystemExit) as refused:
        job.main(["--model", str(model_registry / "default.pt"), *data, "--split", "test"])
    assert refused.value.code == 2 and "invalid choice: 'test'" in capsys.readouterr().err
    code = job.main(["--model", "nope", *data])
    assert code == 2 and "unknown model id 'nope'" in capsys.readouterr().err
    code = job.main(["--model", "default", "--model-dir", str(model_registry)])
    assert code == 2 and "give either --shards or --csv (with --images)" in capsys.readouterr().err


# --- POST /v1/similar through the real Serve ---------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(600)  # may start the session's Serve
def test_similar_endpoint_finds_the_image_itself(
    serve_url: str, serve_headers: dict[str, str], similar_index
) -> None:
    index = SimilarityIndex(similar_index.path)
    image = index.images[7]
    path = similar_index.catalogue.set_index("image").loc[image, "path"]
    response = httpx.post(
        f"{serve_url}/v1/similar",
        files={"file": ("lesion.jpg", Path(path).read_bytes())},
        params={"k": 5},
        headers=serve_headers,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == "default" and body["k"] == 5 and len(body["neighbours"]) == 5
    assert body["model"]["sha256"] == file_sha256(similar_index.path.with_name("default.pt"))
    first = body["neighbours"][0]
    assert first["image"] == image and first["distance"] < 2e-3
    assert first["label"] == CLASS_NAMES[index.labels[7]]
    distances = [n["distance"] for n in body["neighbours"]]
    assert distances == sorted(distances)
    assert Image.open(io.BytesIO(base64.b64decode(first["thumbnail"]))).size == (32, 32)
    assert set(body["knn_probabilities"]) == set(CLASS_NAMES)
    assert sum(body["knn_probabilities"].values()) == pytest.approx(1.0)
    assert body["knn_top_class"] in CLASS_NAMES and body["vote"] == "class-balanced"
    assert "accepted" in body["gate"] and body["index_rows"] == len(index)

    # the same answer through the form field and the default k
    form = httpx.post(
        f"{serve_url}/v1/similar",
        files={"file": ("lesion.jpg", Path(path).read_bytes())},
        data={"model": "default"},
        headers=serve_headers,
        timeout=120,
    ).json()
    assert form["k"] == 8 and form["neighbours"][0]["image"] == image


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_similar_endpoint_errors(
    serve_url: str, serve_headers: dict[str, str], similar_index, model_registry: Path
) -> None:
    lesion = Path(
        similar_index.catalogue.loc[similar_index.catalogue["split"] == "test", "path"].iloc[0]
    ).read_bytes()

    def post(data: bytes | None = lesion, **params) -> httpx.Response:
        files = {"file": ("x.jpg", data)} if data is not None else None
        return httpx.post(
            f"{serve_url}/v1/similar",
            files=files,
            params=params,
            headers=serve_headers,
            timeout=120,
        )

    # a model without an index: 404 with the command that builds one
    missing = post(model="tiny-random")
    assert missing.status_code == 404
    assert "has no similar-cases index" in missing.json()["detail"]
    assert (
        f"python jobs/build_index.py --model {model_registry / 'tiny-random.pt'}"
        in (missing.json()["detail"])
    )
    # an index of another model file: 409 with the rebuild command, never a 500
    stale = model_registry / "trusted.index.parquet"
    shutil.copy(similar_index.path, stale)
    try:
        conflict = post(model="trusted")
        assert conflict.status_code == 409, conflict.text
        assert "rebuild it: python jobs/build_index.py --model" in conflict.json()["detail"]
    finally:
        stale.unlink()
    assert post(model="trusted").status_code == 404  # picked up without a restart

    # bad input: the same 4xx as /v1/classify
    for data, params in ((b"not an image", {}), (lesion, {"model": "nope"}), (b"", {})):
        ours = post(data, **params)
        theirs = httpx.post(
            f"{serve_url}/v1/classify",
            files={"file": ("x.jpg", data)},
            params=params,
            headers=serve_headers,
            timeout=60,
        )
        assert ours.status_code == theirs.status_code and 400 <= ours.status_code < 500
        assert ours.json()["detail"] == theirs.json()["detail"]
    for k in ("0", str(MAX_K + 1), "three", "2.5"):
        bad = post(k=k)
        assert bad.status_code == 422 and "k must be" in bad.json()["detail"]
    no_file = httpx.post(
        f"{serve_url}/v1/similar", data={"x": "1"}, headers=serve_headers, timeout=60
    )
    assert 400 <= no_file.status_code < 500 and "detail" in no_file.json()
