"""`python -m dermanet.demo` (`make demo`): model choice, and one real start and Ctrl-C stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dermanet.demo import DEMO_ACCOUNT, DemoError, choose_model, demo_key, port_free
from dermanet.paths import PROJECT_ROOT

pytest_plugins = ["conftest_serve"]


def test_registry_with_checkpoints_is_served_as_is(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "default.pt").write_bytes(b"x")
    choice = choose_model(tmp_path / "weights", [tmp_path / "outputs"], tmp_path / "scratch")
    assert choice.registry == tmp_path / "weights" and choice.default_model is None
    assert "default" in choice.note and not choice.temporary


def test_empty_registry_falls_back_to_the_newest_best_checkpoint(tmp_path: Path) -> None:
    old = tmp_path / "outputs" / "old-run" / "best.pt"
    new = tmp_path / "runs" / "derm 96" / "best.pt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    choice = choose_model(
        tmp_path / "weights", [tmp_path / "outputs", tmp_path / "runs"], tmp_path / "scratch"
    )
    assert choice.default_model == "derm-96" and choice.temporary
    assert (choice.registry / "derm-96.pt").resolve() == new.resolve()
    assert str(new) in choice.note and "no checkpoint" in choice.note


def test_no_checkpoint_at_all_explains(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="holds no checkpoint"):
        choose_model(tmp_path / "weights", [tmp_path / "outputs"], tmp_path / "scratch")
    env = {**os.environ, "DERMANET_MODEL_DIR": str(tmp_path / "weights")}
    run = subprocess.run(
        [sys.executable, "-m", "dermanet.demo", "--serve-port", "1", "--ui-port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if (PROJECT_ROOT / "outputs").is_dir() or (PROJECT_ROOT / "runs").is_dir():
        pytest.skip("this checkout has outputs/ or runs/: the fallback may find a checkpoint")
    assert run.returncode == 2 and "jobs/train.py" in run.stderr and "weights/" in run.stderr


def test_each_demo_run_gets_a_fresh_key_of_its_own_admin(tmp_path: Path) -> None:
    from dermanet.accounts import revoke_account
    from dermanet.accounts.store import authenticate
    from dermanet.db import session_factory

    url = f"sqlite:///{tmp_path / 'demo.db'}"  # not upgraded yet: the demo does it
    first, second = demo_key(url), demo_key(url)
    with session_factory(url)() as session:  # authenticate commits its `last_used_at`
        assert authenticate(session, first) is None  # only hashes were kept: the old key goes
        who = authenticate(session, second)
        assert (who.name, who.role) == (DEMO_ACCOUNT, "admin")
        revoke_account(session, DEMO_ACCOUNT)
        session.commit()
    with pytest.raises(DemoError, match="revoked"):
        demo_key(url)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_demo_starts_both_and_ctrl_c_stops_exactly_them(model_registry: Path, tmp_path) -> None:
    serve_port, ui_port = _free_port(), _free_port()
    command = [
        sys.executable,
        "-m",
        "dermanet.demo",
        "--model-dir",
        str(model_registry),
        "--serve-port",
        str(serve_port),
        "--ui-port",
        str(ui_port),
        "--upload-dir",
        str(tmp_path / "uploads"),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    demo = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # as a terminal would: the demo leads its own group
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 360
        while time.monotonic() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        output = "".join(lines)
        assert "Press Ctrl-C" in output, output
        assert (
            f"http://127.0.0.1:{ui_port}" in output and f"http://127.0.0.1:{serve_port}" in output
        )
        assert httpx.get(f"http://127.0.0.1:{serve_port}/healthz", timeout=10).status_code == 200
        assert f"as account '{DEMO_ACCOUNT}'" in output and str(tmp_path / "data") in output
        key = output.split("with the key\n", 1)[1].split()[0]
        me = httpx.get(
            f"http://127.0.0.1:{serve_port}/v1/me",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert me.json() == {"name": DEMO_ACCOUNT, "role": "admin"}, output
        assert httpx.get(f"http://127.0.0.1:{serve_port}/v1/me", timeout=10).status_code == 401
        page = httpx.get(f"http://127.0.0.1:{ui_port}/", timeout=10)
        assert page.status_code == 200 and "streamlit" in page.text.lower()
        children = [pid for pid in _descendants(demo.pid) if pid != demo.pid]
        assert children
        os.kill(demo.pid, signal.SIGINT)  # what Ctrl-C sends to the demo
        rest, _ = demo.communicate(timeout=150)
        output += rest
        assert demo.returncode == 0, output
        assert "Stopped everything the demo started." in output
        assert port_free("127.0.0.1", serve_port) and port_free("127.0.0.1", ui_port)
        time.sleep(1)
        alive = [pid for pid in children if Path(f"/proc/{pid}").exists() and _not_zombie(pid)]
        assert not alive, f"left running: {alive}"
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
    found, frontier = [root], [root]
    while frontier:
        current = frontier.pop()
        kids = [pid for pid, parent in parents.items() if parent == current]
        found += kids
        frontier += kids
    return found


def _not_zombie(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}") / "stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
