"""Weight averages of checkpoints: exact means, a servable file, clear refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dermanet.inference import load_checkpoint, save_checkpoint
from dermanet.inference.averaging import average_checkpoints
from dermanet.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dermanet_tiny.yaml"
SMALL = ROOT / "configs" / "dermanet_small.yaml"


def _checkpoint(path: Path, seed: int, config: Path = TINY, **kwargs) -> Path:
    torch.manual_seed(seed)
    model = create_model(config)
    for buffer_name, buffer in model.named_buffers():  # distinct BatchNorm statistics too
        if buffer.is_floating_point():
            buffer.uniform_(0.5, 1.5)
        elif buffer_name.endswith("num_batches_tracked"):
            buffer.fill_(seed + 1)
    return save_checkpoint(path, model, img_size=48, **kwargs)


def test_average_is_the_mean_of_every_tensor(tmp_path: Path) -> None:
    paths = [_checkpoint(tmp_path / f"m{seed}.pt", seed) for seed in range(3)]
    out = average_checkpoints(paths, tmp_path / "avg.pt", img_size=64)
    averaged = load_checkpoint(out)
    states = [load_checkpoint(p).model.state_dict() for p in paths]
    for name, value in averaged.model.state_dict().items():
        if value.is_floating_point():
            expected = sum(s[name] for s in states) / 3
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, states[0][name]), name
    assert averaged.img_size == 64
    assert averaged.provenance["weight_average_of"] == [str(p.resolve()) for p in paths]
    assert averaged.provenance["img_sizes_trained"] == [48, 48, 48]
    assert averaged.metrics == {} and averaged.temperature == 1.0 and averaged.tta == "none"
    logits = averaged.model(torch.rand(2, 3, 64, 64)).logits
    assert logits.shape == (2, 8) and torch.isfinite(logits).all()


def test_refuses_checkpoints_that_do_not_share_architecture_or_preprocessing(
    tmp_path: Path,
) -> None:
    tiny = _checkpoint(tmp_path / "tiny.pt", 0)
    with pytest.raises(ValueError, match="at least two checkpoints"):
        average_checkpoints([tiny], tmp_path / "avg.pt")
    small = _checkpoint(tmp_path / "small.pt", 1, config=SMALL)
    with pytest.raises(ValueError, match="model_config differs"):
        average_checkpoints([tiny, small], tmp_path / "avg.pt")
    gray = _checkpoint(tmp_path / "gray.pt", 2, preprocessing={"color_constancy": "shades_of_gray"})
    with pytest.raises(ValueError, match="color_constancy differs"):
        average_checkpoints([tiny, gray], tmp_path / "avg.pt")
    assert not (tmp_path / "avg.pt").exists()


def test_cli_writes_the_average_and_explains_errors(tmp_path: Path) -> None:
    a, b = _checkpoint(tmp_path / "a.pt", 0), _checkpoint(tmp_path / "b.pt", 1)
    job = [sys.executable, str(ROOT / "jobs" / "average_weights.py")]
    done = subprocess.run(
        [*job, str(a), str(b), "--output", str(tmp_path / "avg.pt")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote the average of 2 checkpoints" in done.stdout
    assert load_checkpoint(tmp_path / "avg.pt").img_size == 48
    missing = subprocess.run(
        [*job, str(a), str(tmp_path / "nope.pt"), "--output", str(tmp_path / "x.pt")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert missing.returncode == 2
    assert "nope.pt does not exist" in missing.stderr and "Traceback" not in missing.stderr
