"""Command-line flags the Ray jobs share, declared once so they read and behave the same."""

from __future__ import annotations

import argparse
from typing import Any

ADDRESS_HELP = "Ray cluster to join; when unset: RAY_ADDRESS, else a new local Ray"


def add_address_argument(parser: argparse.ArgumentParser | Any) -> None:
    """--address: join a running cluster instead of starting a local Ray."""
    parser.add_argument("--address", help=ADDRESS_HELP)


def add_run_arguments(
    parser: argparse.ArgumentParser, defaults: Any, storage_help: str
) -> argparse._ArgumentGroup:
    """The "run" group of a Ray Train job: where results go, workers, resources, retries.

    `defaults` is the job's settings dataclass instance (TrainSettings, PretrainSettings), so
    --help shows the same defaults the code uses.
    """
    run = parser.add_argument_group("run")
    run.add_argument("--storage-path", default=defaults.storage_path, help=storage_help)
    run.add_argument(
        "--name", "--experiment-name", dest="name", default=defaults.name,
        help="experiment name: re-running with the same name and storage path resumes",
    )  # fmt: skip
    run.add_argument(
        "--num-workers", "--workers", dest="num_workers", type=int,
        default=defaults.num_workers, help="Ray Train workers (one process and data shard each)",
    )  # fmt: skip
    run.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    run.add_argument(
        "--cpus-per-worker", type=float, default=defaults.cpus_per_worker,
        help="CPUs reserved per training worker",
    )  # fmt: skip
    run.add_argument(
        "--data-cpus", type=float, default=defaults.data_cpus,
        help="CPUs for Ray Data decode+augment (two tasks of half each)",
    )  # fmt: skip
    run.add_argument(
        "--max-failures", type=int, default=defaults.max_failures,
        help="worker-group retries (each resumes from the last checkpoint)",
    )  # fmt: skip
    add_address_argument(run)
    return run
