"""Shared fixtures: synthetic data (always available) and the real derm-sample (when present)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest
import torch

from dermanet.data.synthetic import generate_synthetic_dataset
from dermanet.paths import PROJECT_ROOT, SAMPLE_DIR_ENV, sample_available, sample_dir

torch.set_num_threads(1)  # 2 shared cores: OpenMP spin-waits made tests 4-10x slower under load
# Every Ray the tests start (the session's, the jobs' own, the test heads) inherits these. Ray
# Train's controller polls its workers every 2 s: a run's start, each epoch's report and its end
# wait for the next poll, seconds per run of a few-second epoch. The preemption watcher (one
# more actor process per run) watches for cloud preemption notices, which never come here.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# The real metadata files sit beside derm-sample (shared/data/formats), wherever that is.
FORMATS_DIR = sample_dir().parent / "formats"


def load_job(name: str) -> ModuleType:
    """jobs/<name>.py as a module (jobs/ is scripts, not a package): its parser and main()."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_job", PROJECT_ROOT / "jobs" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SYNTHETIC data set in the plain-CSV format (160 images, 64 px)."""
    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_dataset(out, num_images=160, size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def derm_sample() -> Path:
    """The real derm-sample folder, or a skip that says how to provide it."""
    if not sample_available():
        pytest.skip(
            f"real derm-sample data not found at {sample_dir()}; set {SAMPLE_DIR_ENV} to a folder "
            "with metadata.csv and images/"
        )
    return sample_dir()


@pytest.fixture(scope="session")
def formats_dir() -> Path:
    """The real published metadata files (HAM10000, ISIC 2019 table)."""
    if not (FORMATS_DIR / "HAM10000_metadata.csv").is_file():
        pytest.skip(f"real metadata files not found at {FORMATS_DIR.resolve()}")
    return FORMATS_DIR.resolve()


@pytest.fixture(scope="session")
def derm_sample_catalogue(derm_sample: Path) -> pd.DataFrame:
    from dermanet.data import read_plain_csv

    return read_plain_csv(derm_sample / "metadata.csv", derm_sample / "images")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the whole test session (starting Ray costs ~4 s and ~1 GB).

    8 logical CPUs on this 2-core machine, so Ray Data tasks, Train workers and Serve replicas
    (the Serve fixture's Ray is this same one when it starts first) never wait on each other
    forever (Ray waits instead of failing when CPUs run out).
    """
    import ray

    from dermanet.runtime import init_ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    init_ray(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
