"""Serving under faults, over real HTTP on loopback: overload, a killed replica, a bad model.

A second app ("faults", at /faults) runs on the session's Ray + Serve with tiny untrained
models and deliberately small queues, so overload is cheap to cause; every load is bounded in
requests and time. The dashboard client's retry rules are checked against a mock transport.
"""

from __future__ import annotations

import asyncio
import functools
import io
import itertools
import os
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from ray import serve

from dermanet.classes import CLASS_NAMES
from dermanet.data.synthetic import draw_lesion
from dermanet.inference import save_checkpoint
from dermanet.models import create_model
from dermanet.serving import ServeSettings, build_app
from dermanet.serving.runner import (
    HAPROXY_ENV,
    HAPROXY_FILE_ENVS,
    HAPROXY_PORT_ENVS,
    haproxy_private,
    release_haproxy_folders,
    wait_ready,
)
from dermanet.ui.client import ServeBusy, ServeClient, ServeError
from tools.replicas import (
    kill_replica,
    replica_names,
    wait_for_replacement,
    wait_for_running,
)

pytest_plugins = ["conftest_serve"]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

APP = "faults"
TINY = Path(__file__).resolve().parents[1] / "configs" / "dermanet_tiny.yaml"
# 2 Classifier replicas x 4 ongoing + 8 queued: a 17th concurrent request is shed; with one
# replica dead, 12 still fit (the kill test's 6 clients plus the retries of the dead one's 4)
SETTINGS = {
    "max_batch_size": 4,
    "max_ongoing_requests": 4,
    "max_queued_requests": 8,
    "gradcam_max_queued_requests": 2,
    "batch_wait_timeout_s": 0.005,
    "retry_after_s": 1.0,
}


@functools.cache
def jpeg(seed: int, side: int = 120) -> bytes:
    """A SYNTHETIC lesion (it passes the image-quality checks that random noise would fail)."""
    pixels, _ = draw_lesion(CLASS_NAMES[seed % len(CLASS_NAMES)], side, np.random.default_rng(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faults(serve_url: str, serve_account: SimpleNamespace, tmp_path_factory):
    """The faults app on its own registry: `default` (64 px) and `second` (48 px), and the
    session server's database and key (`headers`)."""
    registry = tmp_path_factory.mktemp("faults-registry")
    torch.manual_seed(2)
    save_checkpoint(registry / "default.pt", create_model(TINY), img_size=64)
    save_checkpoint(registry / "second.pt", create_model(TINY), img_size=48)
    settings = ServeSettings(
        model_dir=str(registry),
        database_url=serve_account.database_url,
        data_dir=str(serve_account.data_dir),
        **SETTINGS,
    )
    serve.run(build_app(settings), name=APP, route_prefix=f"/{APP}")
    url = f"{serve_url}/{APP}"
    try:
        wait_ready(url, timeout_s=180)
        wait_for_running("Classifier", 2, app=APP)
        yield SimpleNamespace(url=url, registry=registry, headers=serve_account.headers)
    finally:
        serve.delete(APP)


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer at all (connection dropped, timeout)
    seconds: float
    done_at: float
    retry_after: str | None = None
    body: dict | None = None
    error: str = ""


async def _load(
    target: SimpleNamespace,
    path: str,
    clients: int,
    stop: threading.Event | None,
    per_client: int,
    outcomes: list[Outcome],
) -> list[Outcome]:
    """`clients` closed-loop clients, each sending up to `per_client` requests (or until
    `stop`); a 503 is not waited on, so the queue stays under pressure. Appends as they end."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=target.url, headers=target.headers, timeout=60, limits=limits
    ) as client:

        async def one_client(index: int) -> None:
            for i in range(per_client):
                if stop is not None and stop.is_set():
                    return
                data = jpeg((index + i) % 16)
                started = time.perf_counter()
                try:
                    r = await client.post(path, files={"file": ("x.jpg", data)})
                    body = r.json() if r.headers.get("content-type") == "application/json" else None
                    outcome = Outcome(
                        r.status_code,
                        time.perf_counter() - started,
                        time.monotonic(),
                        r.headers.get("retry-after"),
                        body,
                    )
                except httpx.HTTPError as exc:
                    outcome = Outcome(
                        None, time.perf_counter() - started, time.monotonic(), error=repr(exc)
                    )
                outcomes.append(outcome)

        await asyncio.gather(*(one_client(i) for i in range(clients)))
    return outcomes


def load(target, path="/v1/classify", clients=8, per_client=10, stop=None) -> list[Outcome]:
    return asyncio.run(_load(target, path, clients, stop, per_client, []))


class Background:
    """Load in a thread until stopped (at most `per_client` requests per client)."""

    def __init__(self, target: SimpleNamespace, clients: int, per_client: int = 400):
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self.thread = threading.Thread(
            target=lambda: asyncio.run(
                _load(target, "/v1/classify", clients, self.stop, per_client, self.outcomes)
            ),
            daemon=True,
        )

    def __enter__(self) -> Background:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "load did not stop"


class _SignedIn(httpx.HTTPTransport):
    """Adds the test account's key to every request of a client built without one."""

    def __init__(self, headers: dict[str, str]):
        super().__init__()
        self.auth = headers

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.headers.update(self.auth)
        return super().handle_request(request)


def signed_in(target: SimpleNamespace) -> httpx.BaseTransport:
    return _SignedIn(target.headers)


def longest_silence(outcomes: list[Outcome], start: float, end: float) -> float:
    """The longest stretch in [start, end] with no 200 completing."""
    marks = sorted([start, end, *(o.done_at for o in outcomes if o.status == 200)])
    marks = [m for m in marks if start <= m <= end]
    return max(b - a for a, b in itertools.pairwise(marks))


# --- 1. load shedding ----------------------------------------------------------------------------
def test_overload_answers_only_200_or_a_quick_503_with_retry_after(faults) -> None:
    outcomes = load(faults, clients=48, per_client=6)
    statuses = {o.status for o in outcomes}
    assert statuses <= {200, 503}, [
        (o.status, o.error, o.body) for o in outcomes if o.status not in (200, 503)
    ][:5]
    shed = [o for o in outcomes if o.status == 503]
    served = [o for o in outcomes if o.status == 200]
    assert shed and served, f"{len(shed)} shed, {len(served)} served of {len(outcomes)}"
    for o in shed:
        assert o.retry_after == "1" and o.body is not None, (o.retry_after, o.body)
        assert o.body["retry_after_s"] == 1 and "busy" in o.body["detail"], o.body
    assert all(set(o.body["probabilities"]) and o.body["model_id"] == "default" for o in served)
    assert max(o.seconds for o in shed) < 10  # a refusal never hangs (its speed: benchmarks)
    # shed at the ingress's admission (2 x 4 + 8 = 16 admitted), after the 0.5 s hold that
    # keeps a client resending at once from spinning the proxy
    assert statistics.median(o.seconds for o in shed) >= 0.45, sorted(o.seconds for o in shed)


def test_dashboard_client_retries_after_the_advice_then_says_busy(faults) -> None:
    with Background(faults, clients=40) as bg:
        deadline = time.monotonic() + 60
        while not any(o.status == 503 for o in list(bg.outcomes)):  # the queue is full now
            assert time.monotonic() < deadline, "40 clients never filled the queue"
            time.sleep(0.2)
        refusal = None
        while refusal is None and time.monotonic() < deadline + 60:
            try:  # with no budget, the first 503 is final: a clear message
                with ServeClient(faults.url, busy_budget_s=0, transport=signed_in(faults)) as once:
                    once.classify([("a.jpg", jpeg(len(bg.outcomes) % 16))])
            except ServeBusy as exc:
                refusal = exc
        assert refusal is not None, "the client was never refused under overload"
        assert "is busy" in str(refusal) and "try again" in str(refusal)
        assert refusal.status is None  # not the image's fault: nothing recorded against it
        sleeps: list[float] = []

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            time.sleep(seconds)

        with ServeClient(
            faults.url, busy_budget_s=60, sleep=sleep, transport=signed_in(faults)
        ) as client:
            results = client.classify([("b.jpg", jpeg(99))])
    assert results[0].model_id == "default"
    assert all(1.0 <= s <= 1.25 for s in sleeps), sleeps  # Retry-After: 1, plus jitter


# --- 2. a replica dies under load ----------------------------------------------------------------
def test_killing_a_classifier_replica_under_load_loses_no_request(faults) -> None:
    before = replica_names("Classifier", app=APP)
    assert len(before) == 2, before
    with Background(faults, clients=6) as bg:
        time.sleep(2.0)
        killed_at = time.monotonic()
        kill_replica(before[0])
        wait_for_replacement("Classifier", before[0], 2, app=APP)  # Serve starts a new one
        replaced_at = time.monotonic()
        time.sleep(1.0)
    failed = [(o.status, o.error, o.body) for o in bg.outcomes if o.status != 200]
    assert not failed, failed[:5]
    after_kill = [o for o in bg.outcomes if o.done_at > killed_at]
    assert len(after_kill) >= 20, len(after_kill)
    silence = longest_silence(bg.outcomes, killed_at, time.monotonic() - 1.0)
    assert silence < 5.0, f"no 200 for {silence:.1f} s after the kill"
    assert replaced_at - killed_at > 1.0  # the load really ran on one replica for a while


def test_killing_the_gradcam_replica_leaves_classify_alone(faults) -> None:
    (name,) = replica_names("GradCam", app=APP)
    with Background(faults, clients=4) as bg:
        time.sleep(1.0)
        killed_at = time.monotonic()
        kill_replica(name)
        cam = httpx.post(
            f"{faults.url}/v1/gradcam",
            files={"file": ("a.jpg", jpeg(5))},
            headers=faults.headers,
            timeout=120,
        )
        assert cam.status_code in (200, 503), cam.text  # retried once, never a 500
        time.sleep(1.0)
    assert {o.status for o in bg.outcomes} == {200}
    assert longest_silence(bg.outcomes, killed_at, bg.outcomes[-1].done_at) < 5.0
    wait_for_replacement("GradCam", name, 1, app=APP)
    cam = httpx.post(
        f"{faults.url}/v1/gradcam",
        files={"file": ("a.jpg", jpeg(5))},
        headers=faults.headers,
        timeout=120,
    )
    assert cam.status_code == 200 and cam.headers["content-type"] == "image/png"


# --- 3. health that means something --------------------------------------------------------------
def _misfit_checkpoint(source: Path, target: Path) -> None:
    """Readable metadata, weights that do not fit the model (passes the listing, fails a load)."""
    data = torch.load(source, weights_only=True)
    name = next(k for k, v in data["state_dict"].items() if v.ndim == 4)
    data["state_dict"][name] = torch.zeros(3, 3, 1, 1)
    torch.save(data, target)


def test_bad_model_files_are_listed_unusable_and_the_others_serve(faults) -> None:
    registry: Path = faults.registry
    (registry / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a checkpoint" * 40)
    _misfit_checkpoint(registry / "second.pt", registry / "misfit.pt")
    try:
        with httpx.Client(base_url=faults.url, headers=faults.headers, timeout=60) as client:
            models = {m["id"]: m for m in client.get("/v1/models").json()["models"]}
            assert set(models) == {"corrupt", "default", "misfit", "second"}
            assert models["default"]["usable"] and models["second"]["usable"]
            assert (
                not models["corrupt"]["usable"] and "not a DermaNet" in models["corrupt"]["error"]
            )
            assert not models["misfit"]["usable"] and "fails to load" in models["misfit"]["error"]
            for bad in ("corrupt", "misfit"):
                r = client.post(
                    "/v1/classify", params={"model": bad}, files={"file": ("a.jpg", jpeg(1))}
                )
                assert r.status_code == 503 and "cannot be used" in r.json()["detail"], r.text
                assert "retry-after" not in r.headers  # not a busy server: retrying will not help
            for good in ("default", "second"):
                r = client.post(
                    "/v1/classify", params={"model": good}, files={"file": ("a.jpg", jpeg(1))}
                )
                assert r.status_code == 200 and r.json()["model_id"] == good, r.text
            assert client.get("/healthz/ready").status_code == 200
    finally:
        (registry / "corrupt.pt").unlink(missing_ok=True)
        (registry / "misfit.pt").unlink(missing_ok=True)


def test_live_and_ready_split(faults) -> None:
    registry: Path = faults.registry
    with httpx.Client(base_url=faults.url, headers=faults.headers, timeout=60) as client:
        ready = client.get("/healthz/ready")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["ready"] and body["default_model"] == "default" and body["forward_ms"] > 0
        assert client.get("/healthz").json()["ready"] is True
        backup = registry / "default.pt.keep"
        shutil.copy2(registry / "default.pt", backup)
        try:  # the default model breaks on disk: not ready (says why), but still live
            _misfit_checkpoint(backup, registry / "default.pt")
            not_ready = client.get("/healthz/ready")
            assert not_ready.status_code == 503, not_ready.text
            assert not_ready.json()["ready"] is False, not_ready.text
            assert "'default' cannot be used: fails to load" in not_ready.json()["detail"]
            assert client.get("/healthz/live").json() == {"status": "live"}
        finally:
            shutil.move(backup, registry / "default.pt")
        assert client.get("/healthz/ready").status_code == 200


# --- the dashboard client's retry rules (no server) ----------------------------------------------
def _scripted(responses: list[httpx.Response]) -> tuple[ServeClient, list[float], list[str]]:
    sleeps: list[float] = []
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return responses.pop(0)

    client = ServeClient("127.0.0.1:9", transport=httpx.MockTransport(handler), sleep=sleeps.append)
    return client, sleeps, paths


BUSY = {"detail": "DermaNet is busy: the classifier queue is full; retry after 2 s"}
LISTING = {"default": "m", "default_reason": "", "models": [], "class_names": []}


def test_client_waits_the_advised_delay_and_then_succeeds() -> None:
    busy = httpx.Response(503, json=BUSY, headers={"retry-after": "2"})
    client, sleeps, paths = _scripted([busy, busy, httpx.Response(200, json=LISTING)])
    assert client.models().default == "m"
    assert len(paths) == 3 and len(sleeps) == 2
    assert all(2.0 <= s <= 2.5 for s in sleeps), sleeps


def test_client_gives_up_with_a_message_when_the_budget_runs_out() -> None:
    busy = httpx.Response(503, json=BUSY, headers={"retry-after": "8"})
    client, sleeps, _ = _scripted([busy] * 10)
    client.busy_budget_s = 20
    with pytest.raises(ServeBusy, match=r"is busy: it turned this request away 3 times") as info:
        client.models()
    assert "queue is full" in str(info.value) and "try again in a minute" in str(info.value)
    assert info.value.attempts == 3 and sum(sleeps) <= 20


def test_client_does_not_retry_a_503_without_retry_after() -> None:
    final = httpx.Response(503, json={"detail": "model 'x' cannot be used: fails to load"})
    client, sleeps, paths = _scripted([final])
    with pytest.raises(ServeError, match="cannot be used") as info:
        client.models()
    assert not isinstance(info.value, ServeBusy) and info.value.status == 503
    assert sleeps == [] and len(paths) == 1


def test_client_reads_a_plain_text_503_from_the_proxy() -> None:
    text = "Request dropped due to backpressure (num_queued_requests=64, max_queued_requests=64)."
    busy = httpx.Response(503, text=text, headers={"retry-after": "0"})
    client, sleeps, _ = _scripted([busy] * 200)
    client.busy_budget_s = 2
    with pytest.raises(ServeBusy, match="backpressure"):
        client.models()
    assert sleeps and all(s >= 0.5 for s in sleeps)  # "Retry-After: 0" is no busy loop


def test_admission_admits_what_the_classifiers_hold() -> None:
    assert ServeSettings().admission_capacity == 2 * 32 + 32
    assert ServeSettings(**SETTINGS).admission_capacity == 2 * 4 + 8
    assert ServeSettings(admission_limit=10).admission_capacity == 10
    assert ServeSettings(admission_limit=-1).admission_capacity is None
    assert ServeSettings(max_queued_requests=-1).admission_capacity is None
    with pytest.raises(ValueError, match="admission_limit=-2"):
        ServeSettings(admission_limit=-2)
    with pytest.raises(ValueError, match="shed_hold_s=-1"):
        ServeSettings(shed_hold_s=-1)


def test_haproxy_mode_gets_its_own_ports_and_files(monkeypatch) -> None:
    names = (*HAPROXY_PORT_ENVS, *HAPROXY_FILE_ENVS)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    assert haproxy_private() == {}  # Serve's own proxy: nothing to set
    monkeypatch.setenv(HAPROXY_ENV, "1")
    first: dict[str, str] = {}
    second: dict[str, str] = {}
    try:
        first = haproxy_private()
        assert set(first) == set(names) and all(os.environ[n] == first[n] for n in names)
        for name in names:
            monkeypatch.delenv(name)
        second = haproxy_private()
        assert all(first[n] != second[n] for n in HAPROXY_FILE_ENVS)
        assert all(0 < int(first[n]) < 65536 for n in HAPROXY_PORT_ENVS)
        node_folder = "x" * 56  # Ray adds one per node; HAProxy's socket path limit is 97
        socket = Path(second["RAY_SERVE_HAPROXY_SOCKET_PATH"])
        assert socket.parent.is_dir() and len(str(socket.parent / node_folder / socket.name)) <= 97
        monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # the operator's: kept
        assert "RAY_SERVE_HAPROXY_STATS_PORT" not in haproxy_private()
    finally:  # this test's folders only: the session's Serve may run in HAProxy mode too
        sockets = (made.get("RAY_SERVE_HAPROXY_SOCKET_PATH") for made in (first, second))
        release_haproxy_folders([Path(path).parent for path in sockets if path])
    assert not socket.parent.exists()
