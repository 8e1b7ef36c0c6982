"""dermanet.inference without Ray: checkpoints, risk policy, predictor and registry."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dermanet.classes import CLASS_NAMES
from dermanet.data.transforms import eval_transform, to_model_input
from dermanet.inference import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointError,
    ModelRegistry,
    NoCheckpointsError,
    Predictor,
    RiskPolicy,
    UnknownModelError,
    load_checkpoint,
    save_checkpoint,
)
from dermanet.models import create_model

TINY = Path(__file__).resolve().parents[1] / "configs" / "dermanet_tiny.yaml"


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "tiny.pt", create_model(TINY), img_size=48)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = create_model(TINY).eval()
    path = save_checkpoint(
        tmp_path / "m.pt",
        model,
        img_size=48,
        metrics={"bacc": np.float32(0.5), "per_class": [1, 2.5]},
        provenance={"run": Path("/runs/1")},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # the temp file was renamed away
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert raw["format_version"] == CHECKPOINT_FORMAT_VERSION
    assert raw["class_names"] == list(CLASS_NAMES) and raw["img_size"] == 48
    assert raw["metrics"] == {"bacc": 0.5, "per_class": [1, 2.5]}
    assert raw["provenance"]["run"] == "/runs/1" and "torch_version" in raw["provenance"]
    loaded = load_checkpoint(path)
    assert not loaded.model.training and loaded.config == model.config
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, model(x).logits)


def test_saved_models_are_as_readable_as_open_makes_them(tiny_checkpoint: Path) -> None:
    """A Serve replica running as another user must be able to read an exported model."""
    umask = os.umask(0o022)
    os.umask(umask)
    assert tiny_checkpoint.stat().st_mode & 0o777 == 0o666 & ~umask
    tiny_checkpoint.chmod(0o640)  # replacing a file keeps its permissions
    save_checkpoint(tiny_checkpoint, create_model(TINY), img_size=48)
    assert tiny_checkpoint.stat().st_mode & 0o777 == 0o640


def test_half_checkpoint_is_smaller_and_loads_as_float32(tmp_path: Path) -> None:
    model = create_model(TINY).eval()
    full = save_checkpoint(tmp_path / "full.pt", model, img_size=48)
    half = save_checkpoint(tmp_path / "half.pt", model, img_size=48, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).logits, model(x).logits, atol=2e-2, rtol=0)


def test_checkpoint_errors_say_what_is_wrong(tmp_path: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a DermaNet checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="no 'format_version'"):
        load_checkpoint(tmp_path / "foreign.pt")
    data = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({**data, "format_version": CHECKPOINT_FORMAT_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="upgrade dermanet"):
        load_checkpoint(tmp_path / "new.pt")
    torch.save({**data, "class_names": ["benign", "malignant"]}, tmp_path / "classes.pt")
    with pytest.raises(CheckpointError, match="class contract"):
        load_checkpoint(tmp_path / "classes.pt")


def test_risk_formula_and_lights() -> None:
    policy = RiskPolicy()
    probs = dict.fromkeys(CLASS_NAMES, 0.0) | {"MEL": 0.2, "BCC": 0.1, "SCC": 0.05, "NV": 0.65}
    result = policy.assess(probs)
    assert result.risk == pytest.approx(1.5 * 0.2 + 1.3 * 0.1 + 0.05)
    assert result.traffic_light == "yellow"
    assert result.malignant == pytest.approx(result.risk) and result.benign == pytest.approx(
        1 - result.risk
    )
    vector = np.zeros(len(CLASS_NAMES))
    vector[CLASS_NAMES.index("MEL")] = 0.1  # risk 0.15: not below green_below
    assert policy.assess(vector).traffic_light == "yellow"
    vector[CLASS_NAMES.index("MEL")] = 0.0999
    assert policy.assess(vector).traffic_light == "green"
    vector[CLASS_NAMES.index("MEL")] = 0.9  # risk 1.35: red, bars clipped
    red = policy.assess(vector)
    assert (red.traffic_light, red.malignant, red.benign) == ("red", 1.0, 0.0)


def test_risk_policy_configuration() -> None:
    env = {
        "DERMANET_RISK_WEIGHTS": "MEL=2,BCC=1",
        "DERMANET_RISK_GREEN_BELOW": "0.1",
        "DERMANET_RISK_YELLOW_BELOW": "0.5",
    }
    policy = RiskPolicy.from_env(env)
    assert policy.to_dict() == {
        "weights": {"MEL": 2.0, "BCC": 1.0},
        "green_below": 0.1,
        "yellow_below": 0.5,
    }
    assert RiskPolicy.from_mapping(policy.to_dict()) == policy
    with pytest.raises(ValueError, match="unknown classes"):
        RiskPolicy(weights={"MELANOMA": 1.0})
    with pytest.raises(ValueError, match="green_below <= yellow_below"):
        RiskPolicy(green_below=0.7, yellow_below=0.6)
    with pytest.raises(ValueError, match="8 probabilities"):
        RiskPolicy().assess([0.5, 0.5])


def test_predictor_uses_the_evaluation_transform(tiny_checkpoint: Path) -> None:
    predictor = Predictor.from_path(tiny_checkpoint)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    expected = to_model_input(
        eval_transform(48, predictor.checkpoint.mean, predictor.checkpoint.std), image
    )
    # same pixels as the albumentations pipeline; normalised on the batch tensor (float order)
    unnormalised = eval_transform(48, normalize=False)(image=image)["image"]
    np.testing.assert_array_equal(predictor.pixels(image), unnormalised)
    np.testing.assert_allclose(predictor.preprocess(image), expected, atol=1e-5, rtol=0)
    images = [rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8) for i in range(3)]
    batch = predictor.predict_batch(images)
    for image, prediction in zip(images, batch, strict=True):
        assert list(prediction.probabilities) == list(CLASS_NAMES)
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
        single = predictor.predict(image).probabilities
        assert single == pytest.approx(prediction.probabilities, abs=1e-6)
        assert prediction.top_class == max(single, key=single.get)
        assert prediction.risk == predictor.risk_policy.assess(prediction.probabilities)
    with pytest.raises(ValueError, match="RGB uint8"):
        predictor.preprocess(np.zeros((10, 10), np.uint8))


def test_stored_temperature_calibrates_served_probabilities(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    raw = Predictor.from_path(save_checkpoint(tmp_path / "raw.pt", model, img_size=48))
    path = save_checkpoint(tmp_path / "cal.pt", model, img_size=48, temperature=2.5)
    calibrated = Predictor.from_path(path)
    assert raw.checkpoint.temperature == 1.0 and calibrated.checkpoint.temperature == 2.5
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = model(torch.from_numpy(raw.preprocess(image))[None]).logits.double()
    np.testing.assert_allclose(raw.probabilities([image])[0], torch.softmax(logits, 1)[0])
    np.testing.assert_allclose(
        calibrated.probabilities([image])[0], torch.softmax(logits / 2.5, 1)[0], rtol=1e-6
    )
    assert max(calibrated.predict(image).probabilities.values()) < max(
        raw.predict(image).probabilities.values()
    )  # T > 1 softens
    assert ModelRegistry(tmp_path).get("cal").to_dict()["calibration_temperature"] == 2.5
    with pytest.raises(ValueError, match="temperature"):
        save_checkpoint(tmp_path / "bad.pt", model, img_size=48, temperature=0.0)
    data = torch.load(path, weights_only=True)
    torch.save({**data, "calibration": {"temperature": -1.0}}, tmp_path / "neg.pt")
    with pytest.raises(CheckpointError, match="temperature"):
        load_checkpoint(tmp_path / "neg.pt")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_served_views_average_the_flipped_logits(tmp_path: Path, backend: str) -> None:
    """A checkpoint served with flips answers softmax(mean of the 4 flipped views' logits / T),
    on either backend, with the plain view's features; unknown view names are refused."""
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    path = save_checkpoint(
        tmp_path / "flips.pt", model, img_size=48, temperature=1.5,
        preprocessing={"tta": "flips"},
    )  # fmt: skip
    predictor = Predictor.from_path(path, backend=backend)
    assert predictor.checkpoint.tta == "flips"
    images = [np.random.default_rng(i).integers(0, 255, (64, 80, 3), np.uint8) for i in range(3)]
    x = predictor.to_tensor(images)
    with torch.no_grad():
        views = [model(v) for v in (x, x.flip(3), x.flip(2), x.flip(2, 3))]
    mean_logits = torch.stack([v.logits for v in views]).mean(0).double()
    np.testing.assert_allclose(
        predictor.probabilities(images), torch.softmax(mean_logits / 1.5, 1), atol=1e-5
    )
    _, features = predictor.forward(images)
    np.testing.assert_allclose(features, views[0].features, atol=1e-4)
    assert not np.allclose(mean_logits, views[0].logits.double(), atol=1e-3)  # views differ
    data = torch.load(path, weights_only=True)
    torch.save({**data, "preprocessing": {"tta": "sideways"}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="test-time views"):
        load_checkpoint(tmp_path / "bad.pt")


def _checkpoint(folder: Path, name: str, mtime: float) -> Path:
    path = save_checkpoint(folder / f"{name}.pt", create_model(TINY), img_size=48)
    os.utime(path, (mtime, mtime))
    return path


def test_registry_lists_and_chooses_a_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DERMANET_DEFAULT_MODEL", raising=False)
    now = time.time()
    _checkpoint(tmp_path, "older", now - 100)
    _checkpoint(tmp_path, "newer", now)
    (tmp_path / "broken.pt").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("ignored")
    registry = ModelRegistry(tmp_path)
    infos = {info.model_id: info for info in registry.list()}
    assert sorted(infos) == ["broken", "newer", "older"]
    assert infos["older"].img_size == 48 and infos["older"].config["layers"] == [1, 1, 1, 1]
    assert not infos["broken"].usable and "not a DermaNet checkpoint" in infos["broken"].error
    assert registry.default().model_id == "newer" and "newest" in registry.default().reason
    _checkpoint(tmp_path, "default", now - 1000)
    assert registry.default().model_id == "default"
    assert ModelRegistry(tmp_path, default_model="older").default().model_id == "older"
    monkeypatch.setenv("DERMANET_DEFAULT_MODEL", "older")
    assert ModelRegistry(tmp_path).default().model_id == "older"
    assert registry.load("older").img_size == 48


def test_model_version_is_the_hash_of_the_bytes_loaded(tmp_path: Path) -> None:
    """A loaded checkpoint, its registry entry and its answers name the file by the SHA-256
    of its bytes and its recorded creation time; a file without one is dated by its mtime."""
    path = _checkpoint(tmp_path, "m", time.time())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_checkpoint(path)
    assert loaded.version.to_dict() == {
        "id": "m", "sha256": sha, "created": loaded.provenance["created_utc"]
    }  # fmt: skip
    info = ModelRegistry(tmp_path).get("m")
    assert info.to_dict()["sha256"] == sha and info.version == loaded.version
    answer = Predictor(loaded).predict(np.full((60, 60, 3), 120, np.uint8)).to_dict()
    assert answer["model"] == loaded.version.to_dict()
    raw = torch.load(path, weights_only=True)
    del raw["provenance"]["created_utc"]
    undated = tmp_path / "undated.pt"
    torch.save(raw, undated)
    os.utime(undated, (1_700_000_000, 1_700_000_000))
    expected = dt.datetime.fromtimestamp(1_700_000_000, dt.UTC).isoformat(timespec="seconds")
    assert load_checkpoint(undated).version.created == expected
    assert ModelRegistry(tmp_path).get("undated").created == expected
    assert (
        load_checkpoint(undated).version.sha256 == hashlib.sha256(undated.read_bytes()).hexdigest()
    )


def test_registry_never_turns_ids_into_paths(tmp_path: Path) -> None:
    inner = tmp_path / "registry"
    inner.mkdir()
    _checkpoint(inner, "ok", time.time())
    _checkpoint(tmp_path, "outside", time.time())  # a real checkpoint beside the registry
    registry = ModelRegistry(inner)
    for bad in ["../outside", str(tmp_path / "outside.pt"), "ok.pt", "OK", ""]:
        with pytest.raises(UnknownModelError, match="unknown model id"):
            registry.get(bad)
    assert registry.get("ok").model_id == "ok"


def test_empty_registry_says_how_to_get_a_model(tmp_path: Path) -> None:
    for folder in (tmp_path, tmp_path / "missing"):
        with pytest.raises(NoCheckpointsError, match=r"jobs/train.py.*DERMANET_MODEL_DIR"):
            ModelRegistry(folder).default()
