"""Connecting to Ray: a running cluster when one is given, else an embedded local Ray."""

from __future__ import annotations

import logging
import math
import os

import ray

log = logging.getLogger(__name__)


def quiet_ray_data_logs() -> None:
    """Ray Data's INFO banners ("execution finished", "progress bars disabled") off the console.

    Set before Ray starts, so the local Ray's workers inherit it; `RAY_DATA_LOG_LEVEL` set by
    the user wins. Ray Data still writes its full logs to the session's logs folder.
    """
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")


# Ray Serve's throughput-optimised mode (gRPC between deployments, user code on each replica's
# event loop, direct ingress): on 2 cores it lifted /v1/classify at 32 clients 1.6x and halved
# Grad-CAM latency (docs/benchmarks.md, "Serve against the in-process Predictor"). Serve's
# processes read it when Ray starts them, so it is set before a local Ray starts; a value the
# user set wins (0 turns it off). On a cluster, cluster.yaml exports it on every node.
SERVE_FAST_PATH_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def serve_fast_path_default() -> None:
    """Turn on Serve's throughput-optimised mode for a local Ray about to start."""
    os.environ.setdefault(SERVE_FAST_PATH_ENV, "1")


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    include_dashboard: bool | None = None,
    log_to_driver: bool = True,
) -> str | None:
    """Start or join Ray once per process; return the cluster address joined, or None when
    this process runs a local Ray (whose resources cannot grow) or Ray was already up.

    With no address (and no RAY_ADDRESS, as under `ray job submit`) an embedded local Ray is
    started. Under `ray job submit` the job joins the cluster it was submitted to.
    """
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        log.info("joined Ray cluster at %s", address)
        return address
    serve_fast_path_default()
    ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, log_to_driver=log_to_driver)
    log.info("started a local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    return None


def check_storage_location(location: str) -> None:
    """Refuse a relative storage path in a job submitted to a cluster.

    Under `ray job submit` the current directory is Ray's temporary copy of the working dir:
    results written there vanish. Locally, relative paths are fine.
    """
    if os.environ.get("RAY_ADDRESS") and "://" not in location and not os.path.isabs(location):
        raise ValueError(
            f"storage path {location!r} is relative, but this job runs on a Ray cluster whose "
            "working directory is temporary; pass an absolute path on shared storage or an "
            "s3:// / gs:// URI (e.g. --storage-path s3://my-bucket/runs)"
        )


def use_assigned_cpus(threads: int = 0) -> int:
    """Torch threads = the whole CPUs Ray gave this actor (at least 1): two half-CPU Serve
    replicas or batch-inference workers on two cores must not each start a thread per core
    and fight over them. `threads` > 0 overrides it (batch inference's
    `--threads-per-worker`). Call it inside the actor; returns the thread count (ONNX Runtime
    sessions opened after it follow torch's count)."""
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = threads or max(1, math.floor(cpus))
    torch.set_num_threads(threads)
    return threads
