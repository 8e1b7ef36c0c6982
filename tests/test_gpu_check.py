"""benchmarks/gpu_check.py: its CPU dry run goes through every stage (synthetic data, ceiling,
jobs/train.py's run_training on Ray, the shipped model on Serve under load) and reports them;
its GPU plan asks for what a GPU run needs. The GPU run itself needs a CUDA machine."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_dry_run_trains_serves_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    report = json.loads(out.read_text())
    assert report["plan"]["device"] == "cpu" and report["plan"]["img_size"] == 64
    assert report["train"]["steps"] == 6  # 2 epochs x 3 optimiser steps, as planned
    assert len(report["train"]["epochs_end_to_end_images_per_s"]) == 2
    assert report["ceiling"]["images_per_s"] > 0 and report["train"]["end_to_end_images_per_s"] > 0
    assert report["serve"]["requests"] == 8 and report["serve"]["images_per_s"] > 0
    assert report["serve"]["gpus_held_by_replicas"] == 0
    assert "| jobs/train.py end to end (Ray Data + Ray Train) |" in run.stdout


def gpu_plan() -> gpu_check.Plan:
    return gpu_check.Plan(
        device="cuda", model_config=str(ROOT / "configs" / "dermanet_default.yaml"),
        img_size=224, batch_size=128, steps=300, epochs=4, unique_images=512, requests=256,
        concurrency=32,
    )  # fmt: skip


def test_the_gpu_plan_trains_the_default_model_in_bf16_channels_last() -> None:
    if torch.cuda.is_available():
        plan = gpu_check.make_plan(argparse.Namespace(
            dry_run=False, img_size=224, batch_size=128, steps=300, epochs=4, requests=256,
            concurrency=32,
        ))  # fmt: skip
    else:  # without a GPU the check refuses plainly, and the plan is built by hand
        with pytest.raises(SystemExit, match="no CUDA GPU"):
            gpu_check.main(["--out", os.devnull])
        plan = gpu_plan()
    assert plan.device == "cuda" and plan.precision == "bf16-mixed" and plan.channels_last
    assert Path(plan.model_config).name == "dermanet_default.yaml" and plan.img_size == 224
    assert plan.steps_per_epoch * plan.epochs == 300 and plan.epochs >= 3  # a middle epoch


def test_on_a_gpu_the_served_replicas_share_one_gpu(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dermanet.db'}"
    config = gpu_check.serve_config(gpu_plan(), gpu_check.WEIGHTS, 8123, url, tmp_path)
    (app,) = config["applications"]
    gpus = {
        d["name"]: d.get("num_replicas", 1) * d["ray_actor_options"].get("num_gpus", 0)
        for d in app["deployments"]
    }
    assert gpus["Classifier"] > 0 and gpus["GradCam"] > 0 and sum(gpus.values()) <= 1
    assert app["args"]["model_dir"] == str(gpu_check.WEIGHTS) and app["args"]["backend"] == "torch"
    assert app["args"]["database_url"] == url and app["args"]["data_dir"] == str(tmp_path)
    assert (gpu_check.WEIGHTS / "default.pt").is_file()
