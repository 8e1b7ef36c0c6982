"""Fixtures for the dashboard tests (registered with `pytest_plugins`, after conftest_serve).

`dashboard_url` runs the real `streamlit run ui/app.py` against the session's Serve;
`dashboard_keys` adds its accounts to the Serve's database; images are SYNTHETIC, except the
browser screenshot, which prefers a real derm-sample image.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from dermanet.data.synthetic import generate_synthetic_dataset
from dermanet.paths import PROJECT_ROOT, sample_dir

APP = PROJECT_ROOT / "ui" / "app.py"
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
REAL_IMAGES = ("ISIC_0000000.jpg", "ISIC_0000013.jpg", "ISIC_0000002.jpg")
UI_ACCOUNTS = {"ui-alice": "clinician", "ui-bob": "clinician", "ui-root": "admin"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def ui_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four SYNTHETIC lesion images (JPEG) of different classes, 96 px."""
    out = tmp_path_factory.mktemp("ui-images")
    meta = generate_synthetic_dataset(out, num_images=8, size=96, seed=3)
    picked = meta.drop_duplicates("label").head(4)
    return [out / "images" / f"{image}.jpg" for image in picked.image]


@pytest.fixture(scope="session")
def screenshot_images(ui_images: list[Path]) -> list[Path]:
    """Real derm-sample images when present (the README screenshot), else SYNTHETIC ones."""
    real = [sample_dir() / "images" / name for name in REAL_IMAGES]
    if all(path.is_file() for path in real):
        return real
    return ui_images[:3]


@pytest.fixture(scope="session")
def dashboard_keys(serve_account: SimpleNamespace) -> dict[str, str]:
    """Two clinicians and an admin on the session Serve's database (as `python -m
    dermanet.accounts add NAME --role ROLE` makes them); their keys by name."""
    from dermanet.accounts import add_account
    from dermanet.db import session_factory

    with session_factory(serve_account.database_url).begin() as session:
        return {name: add_account(session, name, role)[1] for name, role in UI_ACCOUNTS.items()}


@pytest.fixture()
def ui_env(serve_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The dashboard's environment for in-process AppTest runs; returns the uploads folder."""
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("DERMANET_SERVE_URL", serve_url)
    monkeypatch.setenv("DERMANET_UPLOAD_DIR", str(uploads))
    return uploads


@pytest.fixture(scope="session")
def dashboard_url(serve_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`streamlit run ui/app.py` (headless, 127.0.0.1, a free port) in its own process group."""
    port = free_port()
    uploads = tmp_path_factory.mktemp("dashboard-uploads")
    log = (tmp_path_factory.mktemp("dashboard-log") / "streamlit.log").open("wb")
    env = {
        **os.environ,
        "DERMANET_SERVE_URL": serve_url,
        "DERMANET_UPLOAD_DIR": str(uploads),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address=127.0.0.1",
        f"--server.port={port}",
        "--server.headless=true",
        "--server.fileWatcherType=none",
        "--browser.gatherUsageStats=false",
        "--client.toolbarMode=viewer",
    ]
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"streamlit exited with {process.returncode}; see {log.name}")
            try:
                if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"streamlit did not answer at {url} in 90 s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        log.close()
