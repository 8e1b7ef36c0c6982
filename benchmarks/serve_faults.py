"""Serving under faults: goodput under overload and answers while a replica dies, before/after.

    .venv/bin/python -m benchmarks.serve_faults                     # ~6 min on 2 cores
    .venv/bin/python -m benchmarks.serve_faults --seconds 5 --clients 8 32 --configs after  # try
    .venv/bin/python -m benchmarks.serve_faults --configs after --no-kill --clients 32 128 \\
        --resend advised at-once      # overload with both kinds of client

Starts its own local Ray + Serve (never touching another cluster) on the `weights/` registry
and sends real derm-sample JPEGs (the ISIC-archive ones, 341x256) to /v1/classify from
closed-loop clients that, like the dashboard, wait the advised Retry-After (plus up to 25 %
jitter) after a 503 (`--resend at-once`: clients that resend at once instead, which
shedding must survive cheaply). Configurations, each measured in the same run (--configs):
  before:    one Classifier replica (1 CPU), no queue bound (the baseline without fault
             handling);
  shed-late: 2 replicas, but only a full Classifier queue sheds (after the key check, the body
             and a Classifier call);
  no-hold:   the defaults, but a shed request's 503 is sent at once;
  no-router-queue: the defaults, but the ingress admits only what the replicas hold in
             progress (2 x 32), so no request waits in the ingress's Serve router;
  after:     the defaults: 2 replicas x 0.5 CPU, 32 queued per caller, the ingress admitting what
             they hold and shedding the rest early, 503 + Retry-After after a 0.5 s hold.
The load generator (aiohttp, each upload encoded once) reports its own CPU ("client") beside
the proxy's, the ingress's, the replicas' and Ray's, per second of the measured window.
For each: goodput (200s per second), p50/p99 latency of the accepted requests and the shed
count at each client level; then, with 8 clients, one Classifier replica is SIGKILLed and the
failed requests and the longest time without a 200 are counted until Serve has replaced it.
Refuses to measure a busy machine (`bench_common.refuse_if_busy`; --allow-busy overrides).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pandas as pd

from benchmarks.bench_common import refuse_if_busy
from dermanet.inference import ModelRegistry
from dermanet.paths import sample_available, sample_dir
from dermanet.serving import ServeSettings
from dermanet.serving.runner import private_account, start_local, stop_local
from tools.replicas import kill_replica, replica_names, wait_for_replacement

CONFIGS = {
    "before": {"classifier_replicas": 1, "classifier_num_cpus": 1.0, "max_queued_requests": -1},
    "shed-late": {"admission_limit": -1},  # only the Classifier queue sheds, after key and body
    "no-hold": {"shed_hold_s": 0.0},  # the ingress sheds early, but answers the 503 at once
    "no-router-queue": {"admission_limit": 64},  # admits what the replicas run (2 x 32) only
    "after": {},
}


@dataclass
class Window:
    """Completions of one measured window."""

    seconds: float
    latencies_ok: list[float] = field(default_factory=list)
    shed_latencies: list[float] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)
    ok_times: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by process role

    @property
    def goodput(self) -> float:
        return len(self.latencies_ok) / self.seconds

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies_ok, q)) if self.latencies_ok else float("nan")

    @property
    def failed(self) -> int:
        return sum(self.other.values())


ROLES = (("ProxyActor", "proxy"), (":Ingress", "ingress"), (":Classifier", "classifier"),
         ("raylet", "ray"), ("gcs_server", "ray"))  # fmt: skip
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_by_role() -> dict[str, float]:
    """CPU seconds so far of this process ("client": the load generator) and of every process
    it started (the private Ray: proxy, ingress, classifier replicas, Ray's own), read from
    /proc: where the cores go under overload."""
    parents, used, names = {}, {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            names[entry.name] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[entry.name] = fields[1]
        used[entry.name] = (int(fields[11]) + int(fields[12])) / TICKS
    me = str(os.getpid())
    totals = {"client": used.get(me, 0.0)}
    for pid in used:
        chain, ancestor = set(), parents.get(pid)
        while ancestor and ancestor not in chain and ancestor != me:
            chain.add(ancestor)
            ancestor = parents.get(ancestor)
        if ancestor == me and pid != me:
            role = next((r for key, r in ROLES if key in names[pid]), "other")
            totals[role] = totals.get(role, 0.0) + used[pid]
    return totals


def real_jpegs(count: int) -> list[bytes]:
    if not sample_available():
        sys.exit(f"derm-sample not found at {sample_dir()} (set DERMANET_SAMPLE_DIR)")
    meta = pd.read_csv(sample_dir() / "metadata.csv")
    ids = meta[meta.origin == "ISIC_archive"].image.head(count)
    return [(sample_dir() / "images" / f"{image}.jpg").read_bytes() for image in ids]


def multipart(data: bytes) -> tuple[bytes, str]:
    """A classify request's multipart body (the image in field `file`) and its content type."""
    request = httpx.Request("POST", "http://x/", files={"file": ("a.jpg", data, "image/jpeg")})
    return request.read(), request.headers["content-type"]


@dataclass
class Span:
    """The measured span; `end` may be moved earlier while the load runs (kill phase)."""

    start: float
    end: float


async def closed_loop(
    url: str,
    key: str,
    images: list[bytes],
    clients: int,
    span: Span,
    window: Window,
    resend: str = "advised",
):
    """`clients` clients send back to back until `span.end`; completions inside `span` count.
    After a 503 they wait the advised Retry-After (`resend="advised"`) or resend at once
    (`"at-once"`: misbehaving clients, which shedding must survive cheaply)."""
    headers = {"Authorization": f"Bearer {key}"}
    forms = [multipart(data) for data in images]  # encoded once: the clients' CPU is measured
    # aiohttp, not httpx: at 128 concurrent requests httpx's connection pool spent ~15 ms of CPU
    # per request in this process (about 0.2 ms with aiohttp), starving the server it measures
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(
        url, headers=headers, connector=connector, timeout=timeout
    ) as session:

        async def one_client(index: int) -> None:
            rng = random.Random(index)
            while time.monotonic() < span.end:
                body, content_type = forms[rng.randrange(len(forms))]
                sent = time.monotonic()
                advised = None
                try:
                    async with session.post(
                        "/v1/classify", data=body, headers={"content-type": content_type}
                    ) as response:
                        await response.read()
                        status = str(response.status)
                        advised = response.headers.get("retry-after")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                done = time.monotonic()
                counted = span.start <= done <= span.end
                if status == "200":
                    if counted:
                        window.latencies_ok.append(done - sent)
                        window.ok_times.append(done)
                elif status == "503" and advised is not None:
                    if counted:
                        window.shed_latencies.append(done - sent)
                    if resend == "advised":
                        await asyncio.sleep(max(float(advised), 0.5) * rng.uniform(1.0, 1.25))
                elif counted:
                    window.other[status] = window.other.get(status, 0) + 1

        await asyncio.gather(*(one_client(i) for i in range(clients)))


def measure(
    url: str,
    key: str,
    images: list[bytes],
    clients: int,
    seconds: float,
    warmup: float,
    resend: str,
) -> Window:
    window = Window(seconds)
    start = time.monotonic() + warmup
    marks: list[dict[str, float]] = []  # CPU use at the start and the end of the window
    for delay in (warmup, warmup + seconds):  # not after the drain: that is no load level
        threading.Timer(delay, lambda: marks.append(cpu_by_role())).start()
    span = Span(start, start + seconds)
    asyncio.run(closed_loop(url, key, images, clients, span, window, resend))
    before, after = marks
    window.cpu_s = {role: after[role] - before.get(role, 0.0) for role in after}
    return window


def kill_under_load(url: str, key: str, images: list[bytes], clients: int, max_s: float) -> dict:
    """Kill one Classifier replica after 5 s of load; count until Serve has replaced it."""
    window = Window(max_s)
    begin = time.monotonic()
    span = Span(begin, begin + max_s)
    thread = threading.Thread(
        target=lambda: asyncio.run(closed_loop(url, key, images, clients, span, window)),
        daemon=True,
    )
    thread.start()
    time.sleep(5.0)
    replicas = replica_names("Classifier")
    killed_at = time.monotonic()
    kill_replica(replicas[0])
    try:
        wait_for_replacement("Classifier", replicas[0], len(replicas), timeout_s=max_s)
        replaced_s = time.monotonic() - killed_at
    except TimeoutError:
        replaced_s = float("nan")
    time.sleep(3.0)
    span.end = min(span.end, time.monotonic())
    thread.join(timeout=max_s + 60)
    marks = sorted([killed_at, span.end, *(t for t in window.ok_times if t >= killed_at)])
    silence = max(b - a for a, b in itertools.pairwise(m for m in marks if m <= span.end))
    after = [t for t in window.ok_times if killed_at <= t <= span.end]
    return {
        "failed": window.failed + len(window.shed_latencies),
        "failed_kinds": dict(window.other),
        "silence_s": silence,
        "replaced_s": replaced_s,
        "ok_after_kill": len(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--model-dir", help="registry (default: $DERMANET_MODEL_DIR, weights/)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window per level")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--kill-seconds", type=float, default=60.0, help="kill phase at most")
    parser.add_argument("--kill-clients", type=int, default=8)
    parser.add_argument("--no-kill", action="store_true", help="load levels only")
    parser.add_argument("--configs", nargs="+", default=["before", "after"], choices=list(CONFIGS))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--num-cpus", type=float, default=2, help="logical CPUs for Ray")
    parser.add_argument(
        "--resend",
        nargs="+",
        choices=("advised", "at-once"),
        default=["advised"],
        help="after a 503: wait the advised Retry-After, or resend at once (misbehaving "
        "clients); both: each level measured with each kind of client",
    )
    parser.add_argument(
        "--allow-busy", action="store_true", help="measure even if the machine is already busy"
    )
    args = parser.parse_args()
    load_before = refuse_if_busy(args.allow_busy)
    images = real_jpegs(args.images)
    registry = ModelRegistry(args.model_dir)
    model_id = registry.default().model_id
    rows = []
    kills = {}
    for name in args.configs:
        scratch = Path(tempfile.mkdtemp(prefix="drn-faults-", dir="/tmp"))
        database_url, key = private_account(scratch)
        private = {"database_url": database_url, "data_dir": str(scratch)}
        settings = ServeSettings.from_mapping(
            {"model_dir": str(registry.root), **private, **CONFIGS[name]},
            base=ServeSettings.from_env(),
        )
        try:
            url = start_local(settings, port=args.port, num_cpus=args.num_cpus, temp_dir=scratch)
            for resend, clients in itertools.product(args.resend, args.clients):
                window = measure(url, key, images, clients, args.seconds, args.warmup, resend)
                label = name if args.resend == ["advised"] else f"{name}, resend {resend}"
                rows.append((label, clients, window))
                print(
                    f"{label} c={clients}: {window.goodput:.1f}/s, p99 {window.pct(99):.2f} s, "
                    f"shed {len(window.shed_latencies)}, failed {window.failed}; CPU s/s "
                    + ", ".join(f"{k} {v / args.seconds:.2f}" for k, v in window.cpu_s.items()),
                    flush=True,
                )
            if not args.no_kill:
                kills[name] = kill_under_load(
                    url, key, images, args.kill_clients, args.kill_seconds
                )
                print(f"{name} kill: {kills[name]}", flush=True)
        finally:
            stop_local()
            shutil.rmtree(scratch, ignore_errors=True)

    defaults = ServeSettings()
    capacity = defaults.admission_capacity
    print()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} CPU cores, no GPU, load average before "
        f"{load_before}; model {model_id!r} from "
        f"{registry.root}; {len(images)} real derm-sample JPEGs (ISIC archive, 341x256); "
        f"{args.seconds:g} s measured per level after {args.warmup:g} s warm-up"
    )
    print()
    print(
        "| config | clients | goodput /s | p50 s | p99 s | shed (503) | p99 of a 503 s | failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, clients, w in rows:
        shed99 = np.percentile(w.shed_latencies, 99) if w.shed_latencies else float("nan")
        print(
            f"| {name} | {clients} | {w.goodput:.1f} | {w.pct(50):.2f} | {w.pct(99):.2f} "
            f"| {len(w.shed_latencies)} | {shed99:.2f} | {w.failed} |"
        )
    print()
    for name in dict.fromkeys(n for n, _, _ in rows):  # --clients 32 128 32 128 ...: repeats
        low = [w.goodput for n, c, w in rows if n == name and c == 32]
        high = [w.goodput for n, c, w in rows if n == name and c == 128]
        if low and high:
            ratios = [h / lo for h, lo in zip(high, low, strict=False)]
            print(
                f"{name}: goodput at 128 clients / at 32 = "
                f"{statistics.median(high) / statistics.median(low):.2f} (medians of "
                f"{len(high)} and {len(low)}; paired runs: "
                + ", ".join(f"{r:.2f}" for r in ratios)
                + ")"
            )
    if "after" in args.configs:
        best = max((w.goodput for n, _, w in rows if n.startswith("after")), default=float("nan"))
        print(
            f"after: an accepted request has at most {capacity} ahead of it "
            f"(2 replicas x {defaults.classifier_max_ongoing} ongoing + "
            f"{defaults.max_queued_requests} queued); at {best:.1f}/s that is "
            f"{capacity / best:.1f} s of waiting (the p99 bound, plus one batch)"
        )
    if not kills:
        return
    print()
    print(
        "| config | clients | failed requests | longest time without a 200 (s) "
        "| replica replaced after (s) | 200s after the kill |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, k in kills.items():
        print(
            f"| {name} | {args.kill_clients} | {k['failed']} {k['failed_kinds'] or ''} "
            f"| {k['silence_s']:.1f} | {k['replaced_s']:.1f} | {k['ok_after_kill']} |"
        )


if __name__ == "__main__":
    main()
