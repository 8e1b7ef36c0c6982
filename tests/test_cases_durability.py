"""Nothing lost: 8 clients create cases and upload images to a private Serve (its own process
session and SQLite file), every process of that session is killed with SIGKILL while uploads
are in flight, and a Serve restarted on the same database still has every answer a client was
given with a 201, file included, in a database that passes its integrity check.

A tiny untrained checkpoint: the answers only have to be stored, not right."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from dermanet.demo import session_members
from dermanet.paths import PROJECT_ROOT
from dermanet.serving.runner import free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
CLIENTS = 8
KILL_AFTER = 40  # answered uploads before the kill
TINY = PROJECT_ROOT / "configs" / "dermanet_tiny.yaml"


def start_serve(folder: Path, registry: Path, port: int, ray_tmp: str) -> subprocess.Popen:
    """`python -m dermanet.serving` in its own session, on the folder's SQLite database (Ray's
    files in `ray_tmp`: a killed Ray leaves them behind)."""
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "DERMANET_DATA_DIR": str(folder),
        "DERMANET_DATABASE_URL": f"sqlite:///{folder / 'dermanet.db'}",
        "DERMANET_SERVE_CLASSIFIER_REPLICAS": "1",
        "DERMANET_SERVE_MAX_QUEUED_REQUESTS": "-1",
    }
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "dermanet.serving", "--port", str(port)]
    command += ["--model-dir", str(registry), "--num-cpus", "4"]
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=(folder / f"serve-{port}.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        assert process.poll() is None, (folder / f"serve-{port}.log").read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                return process
        time.sleep(0.5)
    kill_session(process)
    raise AssertionError("the private Serve did not start in 150 s")


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL every process of the Serve's session (driver, Ray's daemons, replicas)."""
    for _ in range(3):  # a process may fork while the first sweep runs
        for pid in session_members(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    process.wait(30)


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sigkill_mid_upload_loses_no_answered_request(tmp_path: Path, request) -> None:
    import torch

    from dermanet.accounts import add_account
    from dermanet.db import make_engine, session_factory, upgrade
    from dermanet.inference import save_checkpoint
    from dermanet.models import create_model

    url = f"sqlite:///{tmp_path / 'dermanet.db'}"
    upgrade(make_engine(url))
    with session_factory(url).begin() as session:
        _, key = add_account(session, "nurse", "clinician")
    headers = {"Authorization": f"Bearer {key}"}
    registry = tmp_path / "registry"
    registry.mkdir()
    torch.manual_seed(0)
    save_checkpoint(registry / "default.pt", create_model(TINY), img_size=64)

    port = free_port()
    ray_tmp = tempfile.mkdtemp(prefix="drn-k-", dir="/tmp")  # short: socket path limit
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    serve = start_serve(tmp_path, registry, port, ray_tmp)
    answered: list[tuple[int, dict, bytes]] = []  # (case_id, 201 body, bytes sent)
    cases: set[int] = set()
    lock, stop = threading.Lock(), threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:
            try:
                made = c.post("/v1/cases", json={"patient": f"KILL-{n}", "lesion": "L1"})
                assert made.status_code == 201, made.text
                case_id = made.json()["case_id"]
                with lock:
                    cases.add(case_id)
                for i in range(1000):
                    if stop.is_set():
                        return
                    data = noise_png(n * 1000 + i)
                    up = c.post(f"/v1/cases/{case_id}/images", files={"file": ("x.png", data)})
                    if up.status_code != 201:
                        return
                    with lock:
                        answered.append((case_id, up.json(), data))
            except httpx.HTTPError:
                return  # the server died under this request: no answer, nothing promised

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 90
        while len(answered) < KILL_AFTER and time.monotonic() < deadline:
            time.sleep(0.05)
        kill_session(serve)  # uploads are in flight: the clients never stopped sending
    finally:
        stop.set()
        if serve.poll() is None:
            kill_session(serve)
        for thread in threads:
            thread.join(60)
    kept = list(answered)
    assert len(kept) >= KILL_AFTER, f"only {len(kept)} uploads answered before the deadline"

    with contextlib.closing(sqlite3.connect(tmp_path / "dermanet.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []

    serve = start_serve(tmp_path, registry, port, ray_tmp)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:
            stored = {}
            for case_id in cases:
                case = c.get(f"/v1/cases/{case_id}")
                assert case.status_code == 200, case.text
                stored |= {image["image_id"]: image for image in case.json()["images"]}
            for _, body, data in kept:
                image = stored[body["image_id"]]
                assert image["answer"] == {
                    k: v for k, v in body.items() if k not in ("image_id", "case_id")
                }
                assert image["sha256"] == hashlib.sha256(data).hexdigest()
            for case_id, body, data in kept[:: max(1, len(kept) // 5)]:
                file = c.get(f"/v1/cases/{case_id}/images/{body['image_id']}/file")
                assert file.status_code == 200 and file.content == data
    finally:
        serve.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            serve.wait(60)
        kill_session(serve)
