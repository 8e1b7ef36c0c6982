"""Two real Ray nodes on one machine: a submitted training run spread over both survives
losing one.

A head (`ray start --head`, test_job_submit's `LocalHead`) and a second node (`ray start
--address=<head>`: its own temp dir, ports and process group) are two raylets. `ray job submit`
runs jobs/train.py on synthetic images with 2 workers and `--placement-strategy SPREAD`; Ray's
state API shows one Train worker on each node. The test then SIGKILLs the second node's raylet
(found among that node's own processes; never `ray stop`), which takes its worker with it.
Ray Train's FailureConfig (`--max-failures`) restarts the worker group from the last
checkpoint; SPREAD (unlike STRICT_SPREAD, which would wait forever for a second node) lets both
workers (0.5 CPU each) land on the head, and the job finishes with every epoch in
logs/metrics.csv exactly once. Storage is one absolute folder both nodes see, as an NFS mount
would be on a real cluster.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from test_job_submit import RAY, ROOT, RUNTIME_ENV, TINY, LocalHead, client_env, free_ports

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

EPOCHS = 3
TRAIN_WORKER = "RayTrainWorker"  # Ray Train's worker actor class


class SecondNode(LocalHead):
    """`ray start --address=<head> --block`: a second raylet with its own temp dir and ports,
    in its own process group, so it can be stopped (or lose its raylet) on its own."""

    def __init__(self, temp_dir: Path, head_gcs: str, num_cpus: int) -> None:
        self.temp_dir = temp_dir
        node_mgr, obj_mgr, metrics, agent_http, agent_grpc, rt_agent = free_ports(6)
        cmd = [
            RAY, "start", "--block", "--disable-usage-stats", "--address", head_gcs,
            "--node-ip-address", "127.0.0.1",
            "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
            "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(rt_agent),
            "--num-cpus", str(num_cpus), "--temp-dir", str(temp_dir),
        ]  # fmt: skip
        self._launch(cmd, "node.log")

    def raylet_pid(self) -> int:
        """This node's raylet: the one `raylet` process among this node's own processes."""
        pids = [pid for pid in self.owned_pids() if _comm(pid) == "raylet"]
        assert len(pids) == 1, f"expected one raylet of the second node, found {pids}"
        return pids[0]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def head_gcs_address(head: LocalHead) -> str:
    """The head's GCS address, from its own `gcs_server` process's command line."""
    for pid in head.owned_pids():
        if _comm(pid) == "gcs_server":
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            port = next(a.split("=", 1)[1] for a in args if a.startswith("--gcs_server_port="))
            return f"127.0.0.1:{port}"
    raise RuntimeError(f"no gcs_server among the head's processes: {head.read_log()}")


def wait_for(condition, what: str, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def train_workers(dashboard: str) -> list:
    from ray.util.state import list_actors

    return list_actors(
        address=dashboard,
        filters=[("class_name", "=", TRAIN_WORKER)],
        detail=True,
        raise_on_missing_output=False,
    )


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[LocalHead, SecondNode]]:
    """A head and a second node; both stopped (their own processes only) whatever happens."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # else the state API client demands a token
    # The head's GCS declares a node dead after this many failed health checks, this far apart
    # (Ray's defaults, 5 x 3 s, are for real networks; a killed raylet here refuses at once).
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    base = Path(tempfile.mkdtemp(prefix="dn2n-", dir="/tmp"))  # short: Unix socket paths
    (base / "h").mkdir()
    (base / "n").mkdir()
    nodes: list[LocalHead] = []
    try:
        head = LocalHead(base / "h" / "ray")
        nodes.append(head)
        head.wait_ready()
        node = SecondNode(base / "n" / "ray", head_gcs_address(head), num_cpus=1)
        nodes.append(node)
        from ray.util.state import list_nodes

        wait_for(
            lambda: len(list_nodes(address=head.dashboard, filters=[("state", "=", "ALIVE")])) == 2,
            "the second node to join",
            timeout=120,
        )
        yield head, node
    finally:
        for started in reversed(nodes):
            started.stop()
        survivors = {pid for started in nodes for pid in started.owned_pids()}
        shutil.rmtree(base, ignore_errors=True)
        assert not survivors, f"processes of the test's nodes survived: {survivors}"


def test_training_spreads_over_two_nodes_and_survives_losing_one(
    cluster: tuple[LocalHead, SecondNode], synthetic_dir: Path
) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    head, node = cluster
    shared = head.temp_dir.parent.parent / "shared"  # what an NFS mount is on a real cluster
    run = subprocess.run(
        [
            RAY, "job", "submit", "--address", head.dashboard, "--no-wait",
            "--working-dir", ".", "--runtime-env", str(RUNTIME_ENV.relative_to(ROOT)),
            "--", "python", "jobs/train.py",
            "--csv", str(synthetic_dir / "metadata.csv"),
            "--images", str(synthetic_dir / "images"),
            "--model-config", TINY, "--img-size", "32", "--batch-size", "16",
            "--epochs", str(EPOCHS), "--warmup-epochs", "0", "--num-workers", "2",
            "--cpus-per-worker", "0.5", "--placement-strategy", "SPREAD",
            "--max-failures", "2", "--storage-path", str(shared), "--name", "two-nodes",
        ],
        cwd=ROOT, env=client_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = next(w for w in run.stdout.replace("'", " ").split() if w.startswith("raysubmit_"))
    jobs = JobSubmissionClient(head.dashboard)
    metrics_csv = shared / "two-nodes" / "logs" / "metrics.csv"

    def job_logs() -> str:
        return jobs.get_job_logs(job_id)[-6000:]

    try:
        # One Train worker on each node while both are up.
        def alive_workers():
            alive = [a for a in train_workers(head.dashboard) if a.state == "ALIVE"]
            return alive if len(alive) == 2 else None

        workers = wait_for(alive_workers, "two live Train workers", timeout=150, every=2)
        node_ids = {n.node_id: n for n in _nodes(head)}
        head_id = next(i for i, n in node_ids.items() if n.is_head_node)
        second_id = next(i for i in node_ids if i != head_id)
        assert {w.node_id for w in workers} == {head_id, second_id}, workers

        # Lose the second node after a checkpoint, before the end.
        def epochs_logged() -> int:
            try:
                return len(pd.read_csv(metrics_csv))
            except (OSError, pd.errors.EmptyDataError):  # not yet written, or being written
                return 0

        wait_for(epochs_logged, "the first epoch's checkpoint", timeout=150, every=0.5)
        epochs_before_loss = epochs_logged()
        assert epochs_before_loss < EPOCHS, "the run ended before the node could be lost"
        os.kill(node.raylet_pid(), 9)
        assert jobs.get_job_status(job_id) == JobStatus.RUNNING

        status = wait_for(
            lambda: (s := jobs.get_job_status(job_id)).is_terminal() and s,
            "the job to end after the node loss",
            timeout=300,
            every=2,
        )
        assert status == JobStatus.SUCCEEDED, job_logs()
    finally:
        if not jobs.get_job_status(job_id).is_terminal():
            jobs.stop_job(job_id)

    history = pd.read_csv(metrics_csv)
    assert history["epoch"].tolist() == list(range(EPOCHS)), history  # each epoch exactly once
    dead = [n for n in _nodes(head) if n.node_id == second_id]
    assert dead and dead[0].state == "DEAD"
    # The retried worker group ran on the head alone: both of its workers, after the first one.
    on_head = [a for a in train_workers(head.dashboard) if a.node_id == head_id]
    assert len(on_head) >= 3, train_workers(head.dashboard)
    assert (shared / "two-nodes" / "best.pt").is_file() and (
        shared / "two-nodes" / "last.pt"
    ).is_file()


def _nodes(head: LocalHead) -> list:
    from ray.util.state import list_nodes

    return list_nodes(address=head.dashboard, detail=True)
