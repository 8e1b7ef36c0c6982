"""Recipes (dermanet.recipes, jobs/reproduce.py): the shipped recipe is the jobs' own settings,
and a recipe runs its stages in order, skips finished ones and resumes a cut training stage."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from dermanet.paths import PROJECT_ROOT
from dermanet.recipes import STATE_FILE, RecipeError, load_recipe, run_recipe

SHIPPED = PROJECT_ROOT / "configs" / "recipes" / "shipped.yaml"
TINY = str(PROJECT_ROOT / "configs" / "dermanet_tiny.yaml")


def _job_parser(script: str):
    spec = importlib.util.spec_from_file_location("job_under_test", PROJECT_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_shipped_recipe_stages_parse_into_their_jobs_settings(tmp_path) -> None:
    """Every key of every stage is a real option of its job, and its value arrives as written:
    each stage's command line goes through the job's own parser."""
    recipe = load_recipe(SHIPPED)
    storage = str(tmp_path)
    assert len(recipe.stages) == 16
    trains = [s for s in recipe.stages if s.job == "train"]
    assert [s.settings["img_size"] for s in trains] == [112, 112, 112, 112, 128, 160, 192]
    assert sum(s.settings["epochs"] for s in trains) == 144  # 141 in the lineage (best.pt 17/20)
    for stage in recipe.stages:
        stage.settings_object(storage)  # the job's rules: ranges and choices
        args = _job_parser(stage.spec.script).parse_args(stage.argv(storage))
        for key, value in stage.resolved(storage).items():
            assert getattr(args, key) == value, f"{stage.name}: {key}"
    # Each input under {storage} is written by an earlier stage: the lineage is complete.
    written: set[str] = set()
    for stage in recipe.stages:
        values = stage.resolved(storage)
        keys = ("shards", "init_checkpoint", "checkpoint", "model", "ood")
        inputs = [values.get(k) for k in keys]
        inputs += values.get("checkpoints", [])
        for path in filter(None, inputs):
            assert any(path.startswith(w) for w in written), f"{stage.name} reads {path}"
        runs = values.get("storage_path")
        written |= {values[k] for k in ("output", "export") if values.get(k)}
        written |= {f"{runs}/{values['name']}/"} if runs else set()


def test_a_stage_with_an_unknown_setting_is_refused_by_name(tmp_path) -> None:
    (tmp_path / "one.yaml").write_text("job: train\nsettings:\n  img_sise: 64\n")
    (tmp_path / "recipe.yaml").write_text("stages: [one.yaml]\n")
    with pytest.raises(RecipeError, match=r"train has no settings \['img_sise'\]"):
        load_recipe(tmp_path / "recipe.yaml")
    (tmp_path / "one.yaml").write_text("job: train\nsettings:\n  img_size: 8\n")
    with pytest.raises(RecipeError, match="--img-size >= 32"):
        run_recipe(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "out", dry_run=True)


def _tiny_recipe(folder: Path, data: Path, epochs: int) -> Path:
    """Two stages: `start` averages two untrained tiny checkpoints (no Ray), `second` trains
    from that average ({storage} lineage): the stage to cut and resume."""
    from dermanet.inference.checkpoint import save_checkpoint
    from dermanet.models import create_model

    parents = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = save_checkpoint(folder / f"parent{seed}.pt", create_model(TINY), img_size=32)
        parents.append(str(path))
    (folder / "start.yaml").write_text(
        f"job: average_weights\nsettings:\n  checkpoints: {parents}\n"
        '  output: "{storage}/models/start.pt"\n'
    )
    (folder / "second.yaml").write_text(
        "job: train\nsettings:\n  name: second\n"
        f'  init_checkpoint: "{{storage}}/models/start.pt"\n  epochs: {epochs}\n'
        f"  warmup_epochs: 0\n  csv: {data / 'metadata.csv'}\n  images: {data / 'images'}\n"
        f"  model_config: {TINY}\n  img_size: 32\n  batch_size: 16\n  num_workers: 1\n"
        '  storage_path: "{storage}/runs"\n'
    )
    (folder / "tiny.yaml").write_text("stages: [start.yaml, second.yaml]\n")
    return folder / "tiny.yaml"


def _runner(recipe: Path, storage: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, str(PROJECT_ROOT / "jobs" / "reproduce.py"), str(recipe)]
    return subprocess.Popen(
        [*command, "--storage-path", str(storage), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the cut kills the jobs and their Ray
    )


def _state(storage: Path) -> dict:
    return json.loads((storage / STATE_FILE).read_text())["stages"]


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_recipe_runs_in_order_skips_finished_stages_and_resumes_a_cut_one(
    synthetic_dir, tmp_path, capfd, monkeypatch
) -> None:
    """A weight-average stage, then a training stage on synthetic images that starts from it.
    The runner is killed (its whole process group, as a lost machine would be) once the
    training stage has checkpointed two of its epochs; the rerun skips the finished stage and
    the job resumes the cut one at its next epoch."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # each job starts its own local Ray
    epochs = 4
    recipe = _tiny_recipe(tmp_path, synthetic_dir, epochs)
    storage = tmp_path / "out"

    cut = _runner(recipe, storage)
    run = storage / "runs" / "second"
    deadline = time.monotonic() + 240
    while len(list(run.glob("checkpoint_*/checkpoint.ckpt"))) < 2 and cut.poll() is None:
        assert time.monotonic() < deadline, "stage `second` checkpointed no 2 epochs in 240 s"
        time.sleep(0.2)
    os.killpg(cut.pid, signal.SIGKILL)
    output, _ = cut.communicate(timeout=60)
    state = _state(storage)
    assert state["start"]["status"] == "finished", output
    assert (storage / "models" / "start.pt").is_file()
    assert state["second"]["status"] == "started", "the cut came too late"

    lines: list[str] = []
    capfd.readouterr()
    assert run_recipe(load_recipe(recipe), storage, echo=lines.append) == 0
    output = capfd.readouterr().out  # the job's own console, a child of this process
    assert lines[0].startswith("stage start: finished") and lines[0].endswith("skipped"), lines
    state = _state(storage)
    assert state["start"]["runs"] == 1 and state["second"]["runs"] == 2
    assert state["second"]["status"] == "finished"
    history = pd.read_csv(run / "logs" / "metrics.csv")
    assert history["epoch"].tolist() == list(range(epochs))
    # Resumed, not restarted: the rerun printed no summary for the epochs already done.
    done = [int(n) for n in re.findall(rf"epoch (\d+)/{epochs} ·", output)]
    assert done and min(done) >= 2 and max(done) == epochs, output[-3000:]

    # Nothing left to run: every stage is skipped, and --until stops where it says.
    lines.clear()
    assert run_recipe(load_recipe(recipe), storage, until="start", echo=lines.append) == 0
    assert len(lines) == 1 and lines[0].endswith("skipped"), lines
