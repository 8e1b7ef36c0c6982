"""`make demo` / `python -m dermanet.demo`: the HTTP API and the dashboard in one command.

1. Picks the model registry: `--model-dir` / $DERMANET_MODEL_DIR / `weights/`; when that holds
   no checkpoint, the newest `best.pt` under `outputs/` or `runs/` (and says which); when there
   is none either, explains how to get one and exits with status 2.
2. Brings the demo's database up to date (`--data-dir`, $DERMANET_DATA_DIR or `data/`; or
   $DERMANET_DATABASE_URL) and gives its `demo` admin account a fresh key (the previous demo
   key is revoked: a key is shown once, so each run shows a new one).
3. Starts a private local Ray with the Serve app (`python -m dermanet.serving`: the same
   application as `serve run serve.app:deployment`) on 127.0.0.1:8000 and waits for /healthz.
4. Starts `streamlit run ui/app.py` headless on 127.0.0.1:8501, pointed at that server.
5. Prints both URLs and how to sign in; Ctrl-C (or SIGTERM) stops exactly those two process
   groups, Serve first asked to shut down its own Ray, and nothing else (never `ray stop`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dermanet.accounts.store import AccountError, add_account, add_key, find_account
from dermanet.db.config import DATA_DIR_ENV, DATABASE_URL_ENV, data_dir, database_url
from dermanet.db.engine import make_engine, session_factory
from dermanet.db.migrate import upgrade
from dermanet.db.models import utcnow
from dermanet.inference.registry import DEFAULT_MODEL_DIR, MODEL_DIR_ENV
from dermanet.paths import PROJECT_ROOT

CHECKPOINT_SUFFIX = ".pt"
DEMO_ACCOUNT = "demo"
RUN_FOLDERS = ("outputs", "runs")
HOW_TO_GET_A_MODEL = f"""No checkpoint found. DermaNet needs one to serve predictions. Either
  * put a checkpoint (.pt from jobs/train.py or jobs/tune.py) into weights/ as weights/default.pt,
  * point ${MODEL_DIR_ENV} (or --model-dir) at a folder of checkpoints, or
  * train one, e.g. on the synthetic data (a few minutes on a laptop CPU):
      .venv/bin/python -m dermanet.data.synthetic --out /tmp/derm-syn --num-images 400 --size 64
      .venv/bin/python jobs/prepare_data.py --csv /tmp/derm-syn/metadata.csv \\
          --images /tmp/derm-syn/images --output /tmp/derm-syn-shards
      .venv/bin/python jobs/train.py --shards /tmp/derm-syn-shards --img-size 64 --epochs 3 \\
          --storage-path outputs --name demo
    then run `make demo` again (it finds outputs/demo/best.pt)."""


class DemoError(RuntimeError):
    """Something the user must fix before the demo can start; the message says what."""


@dataclass(frozen=True)
class ModelChoice:
    """The registry folder Serve gets, the default id in it, and what to tell the user."""

    registry: Path
    default_model: str | None
    note: str
    temporary: bool = False


def checkpoints_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix == CHECKPOINT_SUFFIX and p.is_file() and not p.name.startswith(".")
    )


def newest_best(roots: Sequence[Path]) -> Path | None:
    """The most recently written `best.pt` under the given folders (recursively)."""
    found = [p for root in roots if root.is_dir() for p in root.rglob("best.pt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def choose_model(model_dir: Path, run_roots: Sequence[Path], scratch: Path) -> ModelChoice:
    """The registry to serve, or a DemoError that explains how to get a checkpoint."""
    found = checkpoints_in(model_dir)
    if found:
        names = ", ".join(p.stem for p in found)
        return ModelChoice(model_dir, None, f"Model registry {model_dir} ({names})")
    best = newest_best(run_roots)
    if best is None:
        roots = ", ".join(str(r) for r in run_roots)
        raise DemoError(f"{model_dir} holds no checkpoint and there is no best.pt under {roots}.\n")
    model_id = _safe_id(best.parent.name) or "best"
    registry = scratch / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    (registry / f"{model_id}{CHECKPOINT_SUFFIX}").symlink_to(best.resolve())
    note = (
        f"{model_dir} holds no checkpoint (the default weights are not shipped yet); serving the "
        f"newest best checkpoint instead: {best} (model id {model_id!r})"
    )
    return ModelChoice(registry, model_id, note, temporary=True)


def _safe_id(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip(".-")


def demo_key(url: str) -> str:
    """Upgrade the demo's database and return a fresh key of its `demo` admin account (added
    when absent; its earlier keys are revoked, as only their hashes were kept)."""
    try:
        engine = make_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        with session_factory(url).begin() as session:
            return _fresh_key(session)
    except (SQLAlchemyError, OSError) as exc:
        where = make_url(url).render_as_string(hide_password=True)
        raise DemoError(f"the demo's database {where} cannot be used: {exc}") from None


def _fresh_key(session: Session) -> str:
    try:
        account = find_account(session, DEMO_ACCOUNT)
    except AccountError:
        return add_account(session, DEMO_ACCOUNT, "admin")[1]
    if account.revoked_at is not None:
        raise DemoError(
            f"the account {DEMO_ACCOUNT!r} was revoked by an admin; run the demo on its own "
            "data folder instead (--data-dir)"
        )
    now = utcnow()
    for key in account.keys:
        key.revoked_at = key.revoked_at or now
    return add_key(session, account)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Child:
    """A process started in its own session (so terminal Ctrl-C reaches only the demo)."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str]):
        self.name = name
        self.log = log
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid  # = its process group and session id

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def stop(self, first: int, grace_s: float) -> None:
        """`first` to the group, then SIGKILL for whatever is left in its session."""
        if self.alive():
            self.signal_group(first)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop in {grace_s:.0f} s; killing it", flush=True)
        for pid in session_members(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.alive():
            self.process.kill()
        self.process.wait(10)
        self._log.close()

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def session_members(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (Linux /proc; elsewhere: none found)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def wait_http(url: str, child: Child, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            raise DemoError(
                f"{what} exited with status {child.process.returncode} while starting; "
                f"its log ({child.log}) ends with:\n{child.tail()}"
            )
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(1.0)
    raise DemoError(f"{what} did not answer {url} in {timeout_s:.0f} s ({last}); log: {child.log}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run DermaNet's HTTP API (Ray Serve) and dashboard (Streamlit) locally."
    )
    parser.add_argument(
        "--model-dir", type=Path, help=f"checkpoint folder (${MODEL_DIR_ENV}, weights/)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address of both servers")
    parser.add_argument("--serve-port", type=int, default=8000, help="HTTP API port (8000)")
    parser.add_argument("--ui-port", type=int, default=8501, help="dashboard port (8501)")
    parser.add_argument("--upload-dir", type=Path, help="dashboard uploads (default uploads/)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=f"cases database and stored images (${DATA_DIR_ENV}, else data/)",
    )
    parser.add_argument(
        "--start-timeout", type=float, default=300, help="seconds to wait for each server (300)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    model_dir = (
        args.model_dir or Path(os.environ.get(MODEL_DIR_ENV) or DEFAULT_MODEL_DIR)
    ).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="dermanet-demo-"))
    children: list[Child] = []
    stop = threading.Event()
    interrupts = 0
    failed = True  # logs are kept (their paths were printed) unless the demo ends cleanly

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        stop.set()
        if interrupts > 1:  # a second Ctrl-C: no more waiting
            for child in children:
                child.signal_group(signal.SIGKILL)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            choice = choose_model(model_dir, [PROJECT_ROOT / r for r in RUN_FOLDERS], scratch)
        except DemoError as exc:
            print(f"{exc}\n{HOW_TO_GET_A_MODEL}", file=sys.stderr)
            return 2
        for port, flag in ((args.serve_port, "--serve-port"), (args.ui_port, "--ui-port")):
            if not port_free(args.host, port):
                print(
                    f"Port {port} on {args.host} is in use (another DermaNet or Serve?). Stop "
                    f"it, or choose another port with {flag}.",
                    file=sys.stderr,
                )
                return 2
        print(choice.note, flush=True)
        folder = data_dir(args.data_dir)
        url = database_url(None, folder)
        key = demo_key(url)
        print(f"Cases database {make_url(url).render_as_string(hide_password=True)}", flush=True)
        env = {
            **os.environ,
            "NO_ALBUMENTATIONS_UPDATE": "1",
            DATA_DIR_ENV: str(folder),
            DATABASE_URL_ENV: url,
        }
        env.pop("RAY_ADDRESS", None)  # a private local Ray, never someone's cluster
        serve_url = f"http://{args.host}:{args.serve_port}"
        ui_url = f"http://{args.host}:{args.ui_port}"
        serve_cmd = [
            sys.executable,
            "-m",
            "dermanet.serving",
            "--host",
            args.host,
            "--port",
            str(args.serve_port),
            "--model-dir",
            str(choice.registry),
            "--num-cpus",
            str(max(4, os.cpu_count() or 1)),  # logical: Serve must not wait for CPUs forever
        ]
        if choice.default_model:
            serve_cmd += ["--default-model", choice.default_model]
        print(f"Starting Ray Serve on {serve_url} (log: {scratch / 'serve.log'}) …", flush=True)
        serve = Child("Ray Serve", serve_cmd, scratch / "serve.log", env)
        children.append(serve)
        _wait(stop, wait_http, f"{serve_url}/healthz", serve, args.start_timeout, "Ray Serve")
        ui_env = {**env, "DERMANET_SERVE_URL": serve_url}
        if args.upload_dir:
            ui_env["DERMANET_UPLOAD_DIR"] = str(args.upload_dir.resolve())
        ui_cmd = [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            str(PROJECT_ROOT / "ui" / "app.py"),
            f"--server.address={args.host}",
            f"--server.port={args.ui_port}",
            "--server.headless=true",
            "--browser.gatherUsageStats=false",
            "--server.maxUploadSize=25",
            "--client.toolbarMode=viewer",
        ]
        print(
            f"Starting the dashboard on {ui_url} (log: {scratch / 'streamlit.log'}) …", flush=True
        )
        ui = Child("Streamlit", ui_cmd, scratch / "streamlit.log", ui_env)
        children.append(ui)
        _wait(stop, wait_http, f"{ui_url}/_stcore/health", ui, args.start_timeout, "Streamlit")
        print(
            "\nDermaNet is running (research software, not a medical device):\n"
            f"  Dashboard  {ui_url}\n"
            f"  HTTP API   {serve_url}   (docs: {serve_url}/docs)\n"
            f"Sign in to the dashboard as account {DEMO_ACCOUNT!r} (admin) with the key\n"
            f"  {key}\n"
            "(shown once; the next `make demo` makes a new one; more accounts: "
            "python -m dermanet.accounts add NAME --role clinician)\n"
            "Press Ctrl-C to stop both.\n",
            flush=True,
        )
        while not stop.wait(1.0):
            dead = [child for child in children if not child.alive()]
            if dead:
                child = dead[0]
                print(
                    f"{child.name} stopped unexpectedly (status {child.process.returncode}); "
                    f"its log ({child.log}) ends with:\n{child.tail()}",
                    file=sys.stderr,
                )
                return 1
        failed = False  # stopped by Ctrl-C / SIGTERM: nothing to look into
        return 0
    except DemoError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except _Interrupted:
        failed = False
        return 130
    finally:
        if children:
            print("Stopping …", flush=True)
        for child in reversed(children):  # the dashboard first, then Serve and its Ray
            first = signal.SIGINT if child.name == "Ray Serve" else signal.SIGTERM
            child.stop(first, grace_s=60 if child.name == "Ray Serve" else 15)
        if children:
            print("Stopped everything the demo started.", flush=True)
        _remove_tree(scratch, keep_logs=failed and bool(children))


class _Interrupted(Exception):
    pass


def _wait(stop: threading.Event, fn, *args) -> None:
    """Run a blocking wait in a thread so Ctrl-C during start-up stops promptly."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn(*args)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while thread.is_alive():
        if stop.wait(0.5):
            raise _Interrupted
    if errors:
        raise errors[0]


def _remove_tree(scratch: Path, keep_logs: bool) -> None:
    """The temporary registry (links only) always goes; the logs stay after a failure."""
    registry = scratch / "registry"
    if registry.is_dir():
        for link in registry.iterdir():
            link.unlink()
        registry.rmdir()
    if not keep_logs:
        for log in scratch.glob("*.log"):
            log.unlink()
        with contextlib.suppress(OSError):
            scratch.rmdir()
    else:
        print(f"Logs kept in {scratch}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
