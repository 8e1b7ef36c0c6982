"""Ray Tune over Ray Train trials: ASHA stops weak trials, best config trains, restore resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import load_job

from dermanet.cli import parse_settings
from dermanet.train.supervised import TrainSettings, load_settings_yaml
from dermanet.train.tune import TuneSettings, load_space, run_tune

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "dermanet_tiny.yaml")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
EPOCHS = 2  # ASHA's one rung (grace period 1) sits below the last epoch


def test_space_yaml_is_validated(tmp_path: Path) -> None:
    bad = tmp_path / "space.yaml"
    bad.write_text("learning_rate: {type: uniform, low: 0, high: 1}\n")
    with pytest.raises(ValueError, match=r"\['learning_rate'\] are not training settings"):
        load_space(bad)
    bad.write_text("lr: {type: gaussian}\n")
    with pytest.raises(ValueError, match="unknown type 'gaussian'"):
        load_space(bad)


def _first_trial_finished(experiment: Path, epochs: int) -> bool:
    for progress in experiment.glob("trial_*/progress.csv"):
        if len(pd.read_csv(progress)) >= epochs:
            return True
    return False


def test_search_stops_weak_trials_and_resumes(ray_local, tmp_path: Path) -> None:
    from dermanet.data.synthetic import generate_synthetic_dataset

    data = tmp_path / "data"
    generate_synthetic_dataset(data, num_images=240, size=48, seed=3)
    space = tmp_path / "space.yaml"
    # Trials run in grid order: one that cannot learn (finished before the interruption), then
    # a good one and another hopeless one, which ASHA must cut at epoch 1. (ASHA's rung records
    # do not survive Tuner.restore: Ray pickles the scheduler when the search is created.)
    space.write_text(
        "lr: {type: grid, values: [1.0e-9, 0.004, 1.0e-9]}\nbatch_size: 16\nimg_size: 40\n"
    )
    runs, registry = tmp_path / "runs", tmp_path / "registry"
    args = [
        "--csv",
        str(data / "metadata.csv"),
        "--images",
        str(data / "images"),
        "--space",
        str(space),
        "--epochs",
        str(EPOCHS),
        "--num-samples",
        "1",
        "--search-alg",
        "random",
        "--model-config",
        TINY,
        "--num-workers",
        "1",
        "--storage-path",
        str(runs),
        "--name",
        "search",
        "--registry",
        str(registry),
    ]
    experiment = runs / "search"

    # 1. The job, as a user runs it, interrupted with Ctrl-C once the first trial is done.
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    job = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "tune.py"), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 400
    while not _first_trial_finished(experiment, EPOCHS):
        assert job.poll() is None, "jobs/tune.py ended before it could be interrupted"
        assert time.monotonic() < deadline, "the first trial did not finish in time"
        time.sleep(2)
    job.send_signal(signal.SIGINT)
    job.wait(timeout=180)
    progresses = experiment.glob("trial_*/progress.csv")
    finished = [p.parent.name for p in progresses if len(pd.read_csv(p)) >= EPOCHS]
    assert len(finished) == 1

    # 2. The same experiment again: restored, the finished trial is not rerun.
    table = run_tune(
        TuneSettings(
            base=TrainSettings(
                csv=args[1], images=args[3], model_config=TINY, epochs=EPOCHS, num_workers=1
            ),
            space=str(space),
            name="search",
            storage_path=str(runs),
            search_alg="random",
            registry=str(registry),
        )
    )
    assert len(table) == 3
    progress = pd.read_csv(experiment / finished[0] / "progress.csv")
    assert progress["training_iteration"].tolist() == [1, 2]  # not rerun after restore
    assert (table["epochs"] < EPOCHS).sum() >= 1, f"ASHA stopped nothing:\n{table}"
    stopped = table["status"] == "stopped early"
    assert stopped.sum() == (table["epochs"] < EPOCHS).sum(), table
    assert (table.loc[~stopped, "status"] == "completed").all(), table
    assert all(name.startswith("trial_") and len(name) < 20 for name in table["trial"]), table

    for name in ("trials.csv", "trials.md", "trial_curves.png", "best_config.yaml"):
        assert (experiment / name).is_file()
    best = yaml.safe_load((experiment / "best_config.yaml").read_text())
    assert best["lr"] == pytest.approx(0.004)
    assert (registry / "search-best.pt").is_file()

    # 3. The best config is a valid jobs/train.py --config file: its parser takes it, every
    # value arrives and the settings pass the job's checks. (That these settings train is what
    # the best trial, a run_training with exactly them, just did.)
    values = load_settings_yaml(experiment / "best_config.yaml")
    train_job = load_job("train")
    settings, _ = parse_settings(
        train_job.build_parser(),
        ["--config", str(experiment / "best_config.yaml"), "--storage-path", str(tmp_path)],
        TrainSettings,
    )
    settings.validate()
    assert settings == TrainSettings(**{**values, "storage_path": str(tmp_path)})
    assert settings.lr == pytest.approx(0.004) and settings.csv == args[1]
