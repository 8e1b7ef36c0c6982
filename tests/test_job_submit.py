"""End to end: the documented `ray job submit` commands against a real local head.

Starts `ray start --head --block` (own temp dir, own free ports, dashboard on: the Jobs API
lives there) in its own process group with RAY_AUTH_MODE=disabled (else the CLI demands a token),
submits jobs/pretrain_byol.py and jobs/tune.py (at once) exactly as README "Run on a cluster"
does — `--working-dir . --runtime-env deploy/runtime_env.yaml` — with tiny synthetic settings,
waits, checks SUCCEEDED and the artefacts at the (absolute) storage paths, checks the jobs wrote
nothing into their working directory, and stops only the processes this test started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
RUNTIME_ENV = ROOT / "deploy" / "runtime_env.yaml"
TINY = "configs/dermanet_tiny.yaml"
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="disabled",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` = this venv's python
        NO_ALBUMENTATIONS_UPDATE="1",
        RAY_DATA_DISABLE_PROGRESS_BARS="1",
        **(extra or {}),
    )
    return env


class LocalHead:
    """A `ray start --head --block` in its own process group; `stop()` ends only that group."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        gcs, dash, client, agent_http, agent_grpc, node_mgr, obj_mgr, metrics, rt_agent = (
            free_ports(9)
        )
        self.dashboard = f"http://127.0.0.1:{dash}"
        cmd = [
            RAY, "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1",
            "--port", str(gcs), "--dashboard-port", str(dash), "--include-dashboard", "true",
            "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
            "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rt_agent),
            "--num-cpus", "4", "--temp-dir", str(temp_dir),
        ]  # fmt: skip
        self._launch(cmd, "head.log")

    def _launch(self, cmd: list[str], log_name: str) -> None:
        """Start `cmd` in its own process group, its output in `log_name` beside the temp dir."""
        self.log = open(self.temp_dir.parent / log_name, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, env=client_env(), stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.temp_dir.parent,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 180) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.read_log()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise TimeoutError(f"dashboard not up in {timeout}s: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return (self.temp_dir.parent / "head.log").read_text(errors="replace")[-4000:]

    def owned_pids(self) -> set[int]:
        """This head's processes: its process group, plus anything naming its temp dir."""
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                state, _ppid, pgid = stat.rsplit(")", 1)[1].split()[:3]
                cmdline = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except (OSError, ValueError, IndexError):
                continue
            if state == "Z":  # exited, waiting to be reaped: nothing left to stop
                continue
            if int(pgid) == self.proc.pid or str(self.temp_dir) in cmdline:
                pids.add(int(entry.name))
        return pids

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to what is left 5 s later, to this head's processes only (never
        `ray stop`). A throw-away test cluster has nothing to save: a process that outlives
        SIGTERM by 5 s is killed rather than waited for."""
        for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):
            for pid in self.owned_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait_s
            while self.owned_pids() and time.monotonic() < deadline:
                time.sleep(0.5)
            if not self.owned_pids():
                break
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def head() -> Iterator[LocalHead]:
    base = Path(tempfile.mkdtemp(prefix="dnjs-", dir="/tmp"))  # short: Unix socket paths
    head = LocalHead(base / "ray")
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        survivors = head.owned_pids()
        shutil.rmtree(base, ignore_errors=True)
        assert not survivors, f"processes of the test's head survived: {survivors}"


@pytest.fixture(scope="module")
def synthetic() -> Iterator[Path]:
    out = Path(tempfile.mkdtemp(prefix="dnjs-data-"))
    subprocess.run(
        [sys.executable, "-m", "dermanet.data.synthetic", "--out", str(out),
         "--num-images", "96", "--size", "48"],
        check=True, env=client_env(), cwd=ROOT, timeout=120,
    )  # fmt: skip
    yield out
    shutil.rmtree(out, ignore_errors=True)


def submit(head: LocalHead, job_args: list[str], timeout: float = 420) -> str:
    """`ray job submit` as documented; returns its output, fails on a non-SUCCEEDED job."""
    cmd = [
        RAY, "job", "submit", "--address", head.dashboard,
        "--working-dir", ".", "--runtime-env", str(RUNTIME_ENV.relative_to(ROOT)),
        "--", "python", *job_args,
    ]  # fmt: skip
    for _attempt in range(12):  # the head's job agent registers a little after the dashboard
        try:
            run = subprocess.run(
                cmd, cwd=ROOT, env=client_env(), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            job = _job_id(str(exc.stdout or ""))
            stop = [RAY, "job", "stop", "--address", head.dashboard, "--no-wait", job]
            subprocess.run(stop, env=client_env(), timeout=60)
            raise
        output = run.stdout + run.stderr
        not_ready = "No available agent" in output or (
            # A freshly started (or busy) head can drop the upload request; no job exists yet.
            "ConnectionError" in output and not _job_id(output)
        )
        if not not_ready:
            break
        time.sleep(10)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"ray job submit failed ({run.returncode}):\n{out[-6000:]}"
    assert "succeeded" in out.lower(), out[-6000:]
    return out


def _job_id(output: str) -> str:
    for word in output.replace("'", " ").split():
        if word.startswith("raysubmit_"):
            return word
    return ""


def working_dir_leftovers(head: LocalHead) -> list[str]:
    """Files in the jobs' unpacked working dirs that are not in the repository (cwd writes)."""
    found = []
    for root in head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*"):
        for path in root.rglob("*"):
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts or path.is_dir():
                continue
            if not (ROOT / rel).exists():
                found.append(str(rel))
    return found


def test_runtime_env_keeps_the_upload_small(tmp_path: Path) -> None:
    """The package `--working-dir . --runtime-env deploy/runtime_env.yaml` uploads (< 100 MiB)."""
    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load(RUNTIME_ENV.read_text())["excludes"]
    package = tmp_path / "pkg.zip"
    create_package(  # without .gitignore: the excludes alone must suffice
        str(ROOT), package, include_parent_dir=False, excludes=excludes, include_gitignore=False
    )
    size = package.stat().st_size
    names = zipfile.ZipFile(package).namelist()
    assert size < 20 * 2**20, f"working-dir package is {size / 2**20:.1f} MiB"
    assert "jobs/tune.py" in names and "dermanet/runtime.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "outputs/"))]


def test_submit_byol_and_tune(head: LocalHead, synthetic: Path, tmp_path: Path) -> None:
    """Both jobs at once, as two users would submit them: the head's 4 CPUs hold both (BYOL's
    worker and Ray Data, Tune's trial, worker and Ray Data: 3.1 CPUs)."""
    storage = tmp_path / "storage"  # absolute: the job's cwd is Ray's unpacked working dir
    space = tmp_path / "space.yaml"
    space.write_text("lr: 1.0e-3\nbatch_size: 16\nimg_size: 40\n")
    byol_args = [
        "jobs/pretrain_byol.py", "--data-dirs", str(synthetic / "images"),
        "--model-config", TINY, "--img-size", "40", "--max-epochs", "1",
        "--batch-size", "16", "--proj-hidden-dim", "64", "--pred-hidden-dim", "64",
        "--proj-out-dim", "32", "--num-workers", "1",
        "--storage-path", str(storage / "byol"), "--name", "byol-e2e",
    ]  # fmt: skip
    tune_args = [
        "jobs/tune.py", "--csv", str(synthetic / "metadata.csv"),
        "--images", str(synthetic / "images"), "--space", str(space),
        # absolute: Tune trials run in their own folder (see the report on relative paths)
        "--model-config", str(ROOT / TINY), "--epochs", "1", "--num-samples", "1",
        "--search-alg", "random", "--num-workers", "1",
        "--storage-path", str(storage / "tune"), "--name", "tune-e2e",
        "--registry", str(storage / "registry"),
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=2) as pool:
        submitted = [pool.submit(submit, head, args) for args in (byol_args, tune_args)]
        byol, tuned = (job.result() for job in submitted)

    backbone = storage / "byol" / "byol-e2e" / "backbone.pt"
    assert backbone.is_file(), byol[-3000:]
    assert (storage / "byol" / "byol-e2e" / "logs" / "metrics.csv").is_file()
    experiment = storage / "tune" / "tune-e2e"
    for name in ("trials.csv", "trials.md", "best_config.yaml"):
        assert (experiment / name).is_file(), f"{name} missing:\n{tuned[-3000:]}"
    assert list((storage / "registry").glob("*.pt")), "best checkpoint not in the registry"
    assert working_dir_leftovers(head) == [], "a job wrote into its working directory"
