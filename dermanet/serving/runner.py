"""Starting and stopping a local Ray + Serve for the app (CLI, tests and benchmarks).

`serve run serve.app:deployment` is the usual way; this adds a chosen host/port, a private
Ray instance (never someone else's cluster) and a readiness wait.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from dermanet.runtime import serve_fast_path_default
from dermanet.serving.app import build_app
from dermanet.serving.settings import ServeSettings

APP_NAME = "dermanet"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port nothing listens on now (for a private Serve beside others: tests, benchmarks)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # Ray Serve's switch: HAProxy instead of its proxy
HAPROXY_PORT_ENVS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
# HAProxy's files: Ray Serve puts them all in /tmp/haproxy-serve/ unless told otherwise
HAPROXY_FILE_ENVS = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}


def haproxy_private() -> dict[str, str]:
    """In HAProxy mode, this Serve's own HAProxy stats and metrics ports (free ones) and files
    (config, admin socket, server state, in a new short-named temp folder: Ray adds a node
    folder and HAProxy takes socket paths of at most 97 characters), unless the environment
    sets them: by default HAProxy binds 8404 and 9101 on every interface and every instance
    shares /tmp/haproxy-serve/, so a second HAProxy-mode Serve on the host (the demo beside a
    test) would fail or take over the first one's socket. Set before Ray starts (its processes
    read them then); returns what was set; `stop_local` removes the folder."""
    if os.environ.get(HAPROXY_ENV) != "1":
        return {}
    chosen = {
        name: str(free_port("0.0.0.0")) for name in HAPROXY_PORT_ENVS if name not in os.environ
    }
    if any(name not in os.environ for name in HAPROXY_FILE_ENVS):
        base = Path(tempfile.mkdtemp(prefix="drn-hap-", dir="/tmp"))
        _HAPROXY_FOLDERS.append(base)
        for name, file in HAPROXY_FILE_ENVS.items():
            if name not in os.environ:
                chosen[name] = str(base / file) if file else str(base)
    os.environ.update(chosen)
    return chosen


_HAPROXY_FOLDERS: list[Path] = []  # made by haproxy_private, removed by stop_local


def private_account(
    folder: str | Path, name: str = "bench", role: str = "clinician"
) -> tuple[str, str]:
    """A fresh SQLite database in `folder` (schema upgraded) with one account, for a private
    Serve (benchmarks): its URL and the account's API key."""
    from dermanet.accounts import add_account
    from dermanet.db import make_engine, session_factory, upgrade

    url = f"sqlite:///{Path(folder) / 'dermanet.db'}"
    upgrade(make_engine(url))
    with session_factory(url).begin() as session:
        _, key = add_account(session, name, role)
    return url, key


def start_local(
    settings: ServeSettings | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    num_cpus: float | None = None,
    temp_dir: str | Path | None = None,
    ready_timeout_s: float = 120.0,
) -> str:
    """Start a private local Ray, Serve on host:port and the app; return the base URL."""
    if not ray.is_initialized():
        serve_fast_path_default()
        haproxy_private()
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            namespace="serve",
            _temp_dir=str(temp_dir) if temp_dir else None,
        )
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_ready(url, ready_timeout_s)
    return url


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll /healthz until it answers 200 (Serve can report RUNNING before the proxy routes)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"DermaNet at {url} not ready after {timeout_s:.0f} s: {last}")


def stop_local() -> None:
    """Shut Serve and the private Ray down."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    release_haproxy_folders()


def release_haproxy_folders(folders: list[Path] | None = None) -> None:
    """Remove HAProxy folders `haproxy_private` made (default: all of them)."""
    for folder in list(_HAPROXY_FOLDERS if folders is None else folders):
        shutil.rmtree(folder, ignore_errors=True)
        if folder in _HAPROXY_FOLDERS:
            _HAPROXY_FOLDERS.remove(folder)
