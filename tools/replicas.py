"""Finding and killing this app's Serve replicas: the fault tests and the fault benchmark use
it to make a replica die the way an OOM kill or a lost node does (SIGKILL, no clean-up).

Only replicas of the Ray this process is connected to are seen; nothing else is touched.
"""

from __future__ import annotations

import os
import signal
import time

import ray
from ray import serve
from ray.serve._private.constants import SERVE_NAMESPACE

from dermanet.serving.runner import APP_NAME

REPLICA_PREFIX = "SERVE_REPLICA::"


def replica_names(deployment: str, app: str = APP_NAME) -> list[str]:
    """Actor names of the live replicas of `deployment` (e.g. "Classifier"), sorted."""
    prefix = f"{REPLICA_PREFIX}{app}#{deployment}#"
    actors = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"]
        for a in actors
        if a["namespace"] == SERVE_NAMESPACE and a["name"].startswith(prefix)
    )


def replica_pid(name: str) -> int:
    """The worker process id of one replica actor."""
    actor = ray.get_actor(name, namespace=SERVE_NAMESPACE)
    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30))


def kill_replica(name: str) -> int:
    """SIGKILL the replica's process (returns its pid); Serve notices and starts a new one."""
    pid = replica_pid(name)
    os.kill(pid, signal.SIGKILL)
    return pid


def running_replicas(deployment: str, app: str = APP_NAME) -> int:
    """How many replicas of `deployment` Serve reports RUNNING (constructed and healthy)."""
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return 0
    return int(status.deployments[deployment].replica_states.get("RUNNING", 0))


def wait_for_running(
    deployment: str, count: int, timeout_s: float = 120.0, app: str = APP_NAME
) -> None:
    """Wait until Serve reports `count` RUNNING replicas of `deployment`."""
    deadline = time.monotonic() + timeout_s
    while (running := running_replicas(deployment, app)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{deployment}: {running} of {count} replicas running")
        time.sleep(0.5)


def wait_for_replacement(
    deployment: str, killed: str, count: int, timeout_s: float = 120.0, app: str = APP_NAME
) -> list[str]:
    """Wait until the killed replica is gone and `count` replicas run again; their names."""
    deadline = time.monotonic() + timeout_s
    while True:
        names = replica_names(deployment, app)
        gone = killed not in names and len(names) >= count
        if gone and running_replicas(deployment, app) >= count:
            return names
        if time.monotonic() > deadline:
            raise TimeoutError(f"{deployment}: {killed} not replaced after {timeout_s:.0f} s")
        time.sleep(0.25)
