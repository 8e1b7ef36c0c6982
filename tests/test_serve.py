"""The Serve app over real HTTP: one private Ray + Serve for the whole session."""

from __future__ import annotations

import base64
import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dermanet.classes import CLASS_NAMES
from dermanet.data.images import decode_image
from dermanet.data.synthetic import draw_lesion
from dermanet.inference import Predictor, compute_cams, load_checkpoint
from dermanet.serving import ServeSettings

pytest_plugins = ["conftest_serve"]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]  # session setup: model + Serve


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def random_jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def lesion_jpeg(seed: int, side: int = 120) -> bytes:
    """A SYNTHETIC lesion: it passes the gate's quality checks (random noise does not)."""
    pixels, _ = draw_lesion(CLASS_NAMES[seed % len(CLASS_NAMES)], side, np.random.default_rng(seed))
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


@pytest.fixture(scope="module")
def client(serve_url: str, serve_headers: dict[str, str]):
    with httpx.Client(base_url=serve_url, headers=serve_headers, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def direct(model_registry: Path) -> dict[str, Predictor]:
    """dermanet.inference run in-process on the same checkpoints and backend, for comparisons."""
    backend = ServeSettings().backend  # the served default: ONNX Runtime on a CPU
    return {
        name: Predictor(load_checkpoint(model_registry / f"{name}.pt"), backend=backend)
        for name in ("default", "tiny-random", "trusted")
    }


def classify(client: httpx.Client, data: bytes, **params) -> httpx.Response:
    return client.post("/v1/classify", files={"file": ("lesion.jpg", data)}, params=params)


def test_health_models_and_docs(client: httpx.Client) -> None:
    health = client.get("/healthz").json()  # readiness: the default model answered a probe
    assert health["status"] == "ok" and health["ready"] and health["default_model"] == "default"
    assert client.get("/healthz/live").json() == {"status": "live"}
    listing = client.get("/v1/models").json()
    assert listing["default"] == "default" and "default" in listing["default_reason"]
    models = {m["id"]: m for m in listing["models"]}
    assert sorted(models) == ["default", "tiny-random", "trusted"]
    assert models["default"]["img_size"] == 128 and models["tiny-random"]["img_size"] == 64
    assert models["default"]["provenance"]["data"] == "SYNTHETIC planted lesions"
    assert "path" not in models["default"]  # server paths stay private
    assert listing["class_names"] == list(CLASS_NAMES)
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/healthz/live", "/healthz/ready", "/v1/models"} <= set(paths)
    assert {"/v1/classify", "/v1/gradcam"} <= set(paths)


def test_every_answer_names_the_exact_model_file(client, model_registry: Path) -> None:
    """classify, /v1/models and Grad-CAM (JSON and PNG headers) carry the SHA-256 of the bytes
    of the checkpoint file served, and the creation time it records."""
    files = {name: model_registry / f"{name}.pt" for name in ("default", "trusted")}
    sha = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
    created = {
        name: load_checkpoint(path).provenance["created_utc"] for name, path in files.items()
    }
    listing = {m["id"]: m for m in client.get("/v1/models").json()["models"]}
    for name in files:
        assert listing[name]["sha256"] == sha[name] and listing[name]["created"] == created[name]
        body = classify(client, lesion_jpeg(2), model=name).json()
        assert body["model"] == {"id": name, "sha256": sha[name], "created": created[name]}
    data = lesion_jpeg(3)
    png = client.post("/v1/gradcam", files={"file": ("a.jpg", data)}, params={"model": "trusted"})
    assert png.headers["x-dermanet-model"] == "trusted"
    assert png.headers["x-dermanet-model-sha256"] == sha["trusted"]
    assert png.headers["x-dermanet-model-created"] == created["trusted"]
    body = client.post(
        "/v1/gradcam", files={"file": ("a.jpg", data)}, params={"include_cam": "true"}
    ).json()
    assert body["model"]["sha256"] == sha["default"] == body["prediction"]["model"]["sha256"]
    several = [("file", (f"{i}.jpg", lesion_jpeg(i))) for i in range(2)]
    results = client.post("/v1/classify", files=several).json()["results"]
    assert [r["model"]["sha256"] for r in results] == [sha["default"]] * 2


def assert_same_answer(body, expected, where: str = "answer") -> None:
    """The HTTP answer holds every field of the in-process answer (numbers to 1e-6)."""
    if isinstance(expected, dict):
        assert isinstance(body, dict) and set(expected) <= set(body), where
        for key, value in expected.items():
            assert_same_answer(body[key], value, f"{where}.{key}")
    elif isinstance(expected, float):
        assert body == pytest.approx(expected, abs=1e-6), where
    else:
        assert body == expected, where


@pytest.mark.parametrize("model", ["default", "tiny-random", "trusted"])
def test_classify_equals_direct_inference(client, direct, model: str) -> None:
    data = lesion_jpeg(1)
    body = classify(client, data, model=model).json()
    expected = direct[model].predict(decode_image(data))
    assert body["model_id"] == model and body["filename"] == "lesion.jpg"
    assert list(body["probabilities"]) == list(CLASS_NAMES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
    assert_same_answer(body, expected.to_dict())  # risk, light, gate, prediction set
    assert body["gate"]["accepted"] and body["traffic_light"] in ("green", "yellow", "red")
    assert body["risk"] == pytest.approx(expected.risk.risk, abs=1e-6)
    assert body["latency_ms"] > 0
    raw = client.post(
        "/v1/classify",
        content=data,
        headers={"content-type": "image/jpeg"},
        params={"model": model},
    )
    assert raw.json()["probabilities"] == pytest.approx(body["probabilities"], abs=1e-6)


def test_several_images_in_one_request(client, direct) -> None:
    images = [random_jpeg(seed) for seed in range(3)]
    files = [("file", (f"img{i}.jpg", data)) for i, data in enumerate(images)]
    body = client.post("/v1/classify", files=files).json()
    assert body["model_id"] == "default" and len(body["results"]) == 3
    for i, (result, data) in enumerate(zip(body["results"], images, strict=True)):
        assert result["filename"] == f"img{i}.jpg"
        expected = direct["default"].predict(decode_image(data)).probabilities
        assert result["probabilities"] == pytest.approx(expected, abs=1e-6)


def test_32_concurrent_requests_match_sequential_answers(client) -> None:
    images = [random_jpeg(100 + i, size=(64 + i, 64)) for i in range(32)]
    sequential = [classify(client, data).json() for data in images]
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda data: classify(client, data), images))
    assert [r.status_code for r in responses] == [200] * 32
    for response, alone in zip(responses, sequential, strict=True):
        body = response.json()
        assert body["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-6)
        assert body["top_class"] == alone["top_class"]
    assert max(r.json()["batch_size"] for r in responses) > 1  # @serve.batch really batched


def _modes() -> dict[str, bytes]:
    rgb = Image.fromarray(np.random.default_rng(3).integers(0, 255, (60, 70, 3), dtype=np.uint8))
    sixteen = Image.fromarray((np.random.default_rng(4).random((60, 70)) * 65535).astype(np.uint16))
    return {
        "grayscale": encode(rgb.convert("L")),
        "rgba": encode(rgb.convert("RGBA")),
        "palette": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE)),
        "16-bit": encode(sixteen),
        "cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=95),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_image_modes_are_converted_not_rejected(client, direct, mode: str) -> None:
    data = _modes()[mode]
    response = classify(client, data)
    assert response.status_code == 200, response.text
    expected = direct["default"].predict(decode_image(data)).probabilities
    assert response.json()["probabilities"] == pytest.approx(expected, abs=1e-6)


def _malformed() -> list[tuple[str, str, dict, int, str]]:
    jpeg = random_jpeg(7, size=(300, 300))
    bomb = encode(Image.new("L", (3000, 3000)))  # 9 MP in a few KB; the test limit is 4 MP
    multipart = lambda data, name="lesion.jpg": {"files": {"file": (name, data)}}  # noqa: E731
    raw = lambda data, ctype="image/jpeg": {"content": data, "headers": {"content-type": ctype}}  # noqa: E731
    good = multipart(random_jpeg(8))
    return [
        ("empty raw body", "/v1/classify", raw(b""), 400, "empty"),
        ("empty file", "/v1/classify", multipart(b""), 400, "empty"),
        ("not an image", "/v1/classify", multipart(b"\x00\x01garbage" * 50), 422, "not an image"),
        ("truncated jpeg", "/v1/classify", multipart(jpeg[: len(jpeg) // 2]), 422, "truncated"),
        ("text named .jpg", "/v1/classify", multipart(b"hello doctor", "x.jpg"), 422, "not an"),
        ("body too large", "/v1/classify", raw(b"\xff" * (3 * 1024 * 1024)), 413, "limit"),
        ("pixel bomb", "/v1/classify", multipart(bomb), 413, "over the limit"),
        ("text content type", "/v1/classify", raw(b"hi", "text/plain"), 415, "content type"),
        (
            "no file field",
            "/v1/classify",
            {"data": {"image": "x"}, "files": {"other": ("a", b"x")}},
            400,
            "field 'file'",
        ),
        (
            "too many files",
            "/v1/classify",
            {"files": [("file", (f"{i}.jpg", b"x")) for i in range(17)]},
            400,
            "files",
        ),
        ("unknown model", "/v1/classify?model=resnet9000", good, 404, "unknown model id"),
        ("path as model", "/v1/classify?model=../registry/default", good, 404, "unknown model"),
        ("unknown class index", "/v1/gradcam?target_class=8", good, 422, "unknown class"),
        ("unknown class name", "/v1/gradcam?target_class=melanoma", good, 422, "unknown class"),
        ("bad mode", "/v1/gradcam?mode=sepia", good, 422, "unknown mode"),
        ("bad opacity", "/v1/gradcam?opacity=2", good, 422, "opacity"),
        ("gradcam truncated", "/v1/gradcam", multipart(jpeg[:200]), 422, "truncated"),
    ]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "words"),
    [case[1:] for case in _malformed()],
    ids=[c[0] for c in _malformed()],
)
def test_malformed_uploads_get_4xx_and_the_server_stays_up(
    client, path: str, kwargs: dict, status: int, words: str
) -> None:
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert words in str(detail), detail
    assert classify(client, random_jpeg(9)).status_code == 200


def test_gradcam_png_and_raw_cam(client, model_registry: Path) -> None:
    data = random_jpeg(11, size=(200, 150))
    png = client.post("/v1/gradcam", files={"file": ("a.jpg", data)}, data={"mode": "side_by_side"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (400, 150)
    top = png.headers["x-dermanet-top-class"]
    assert png.headers["x-dermanet-target-class"] == top  # predicted class by default
    body = client.post(
        "/v1/gradcam",
        files={"file": ("a.jpg", data)},
        params={"target_class": "MEL", "include_cam": "true", "opacity": "0.3"},
    ).json()
    assert body["target_class"] == "MEL" and body["cam_shape"] == [128, 128]
    assert Image.open(io.BytesIO(base64.b64decode(body["png_base64"]))).format == "PNG"
    predictor = Predictor(load_checkpoint(model_registry / "default.pt"))
    x = predictor.to_tensor([decode_image(data)])
    expected = compute_cams(predictor.model, x, [CLASS_NAMES.index("MEL")])[0]
    np.testing.assert_allclose(np.array(body["cam"]), expected, atol=2e-3)
