"""Load test of the DermaNet Serve app: /v1/classify throughput and latency, batching on vs off.

    .venv/bin/python benchmarks/serve_load.py                  # private Ray + Serve on :8123
    .venv/bin/python benchmarks/serve_load.py --requests 128 --img-size 224
    .venv/bin/python benchmarks/serve_load.py --repeats 3 --image lesion.jpg   # medians of 3

It first measures the in-process `Predictor` (same model, same backend, same upload: decode +
predict_batch in batches of --max-batch-size, torch/ONNX Runtime on every core), the ceiling
Serve is compared with; then it starts its own local Ray + Serve (never touching another
cluster), measures concurrency 1, 8 and 32 with `@serve.batch` on, redeploys with
max_batch_size=1 (batching off, same replicas, changed through user_config) and measures
again, then Grad-CAM latency. Without a usable registry it uses a temporary one holding an
untrained default-config checkpoint: timing does not depend on the weights. --image sends a
real file (e.g. a derm-sample JPEG re-encoded at 427x320) instead of a synthetic lesion.
Prints a Markdown table for docs/benchmarks.md, with the CPU the load generator itself spent
(it shares the cores with Serve). `RAY_SERVE_ENABLE_HA_PROXY=1` in the environment measures
Serve behind HAProxy instead of its Python proxy.

--storage measures what storing costs instead: on one Serve, in the same run, /v1/classify
against POST /v1/cases/{id}/images (the same classify, plus the file, the answer and the audit
event committed before the answer), alternating runs at each concurrency, every request a
different image (derm-sample JPEGs when present) so every stored file is a new write:

    .venv/bin/python benchmarks/serve_load.py --storage --concurrency 1 32 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from ray import serve

from dermanet.data.synthetic import draw_lesion
from dermanet.inference import ModelRegistry, Predictor, RegistryError, save_checkpoint
from dermanet.models import create_model
from dermanet.serving import ServeSettings, build_app
from dermanet.serving.runner import (
    APP_NAME,
    private_account,
    start_local,
    stop_local,
    wait_ready,
)

# Ray Serve's own switches, read when Ray starts (set them in the environment of this script):
# the throughput-optimised mode (on by default in a local DermaNet Ray) and HAProxy ingress.
SERVE_MODE_ENV = ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_HA_PROXY")


@dataclass
class LoadResult:
    label: str
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    client_cpu_s: float = 0.0  # this process's CPU time over the run: the load generator's share
    run_rates: tuple[float, ...] = ()  # images/s of every repeat when this is their median run

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))


def median_run(runs: list[LoadResult]) -> LoadResult:
    """The run of median throughput, carrying every run's rate: one run on two cores varies by
    up to ±15 %, so a ratio of single runs says little."""
    median = sorted(runs, key=lambda r: r.throughput)[len(runs) // 2]
    return dataclasses.replace(median, run_rates=tuple(r.throughput for r in runs))


def test_image(size: int) -> bytes:
    """A SYNTHETIC lesion as a JPEG of a typical dermoscopy upload size."""
    pixels, _ = draw_lesion("MEL", size, np.random.default_rng(0))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def run_load(
    url: str, path: str, data: bytes | None, concurrency: int, total: int, key: str = ""
) -> LoadResult:
    """`total` POSTs of `data` (GETs when None) from `concurrency` closed-loop clients,
    signed in with `key`."""
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=300, limits=limits
    ) as client:

        async def one() -> None:
            started = time.perf_counter()
            if data is None:
                response = await client.get(path)
            else:
                response = await client.post(path, files={"file": ("lesion.jpg", data)})
            response.raise_for_status()
            latencies.append((time.perf_counter() - started) * 1000)

        async def worker(count: int) -> None:
            for _ in range(count):
                await one()

        for _ in range(min(concurrency, 4)):  # warm-up: models loaded, connections open
            await one()
        latencies.clear()
        shares = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
        cpu_started, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n) for n in shares))
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_started
    return LoadResult(path, concurrency, total, seconds, latencies, client_cpu)


def in_process(
    model_dir: str, backend: str, data: bytes, batch: int, total: int, repeats: int
) -> LoadResult:
    """The registry's default model in this process: decode + predict_batch per `batch`;
    the median of `repeats` runs."""
    registry = ModelRegistry(model_dir)
    predictor = Predictor(registry.load(registry.default().model_id), backend=backend)
    predictor.predict_batch([predictor.decode(data)] * batch)  # warm-up
    runs = []
    for _ in range(repeats):
        latencies: list[float] = []
        started = time.perf_counter()
        for done in range(0, total, batch):
            begun = time.perf_counter()
            predictor.predict_batch([predictor.decode(data)
                                     for _ in range(min(batch, total - done))])  # fmt: skip
            latencies.append((time.perf_counter() - begun) * 1000)
        seconds = time.perf_counter() - started
        runs.append(LoadResult(f"in-process Predictor ({predictor.backend})", batch, total,
                               seconds, latencies))  # fmt: skip
    return median_run(runs)


def ensure_registry(model_dir: str | None, img_size: int, scratch: Path) -> tuple[str, str]:
    try:
        registry = ModelRegistry(model_dir)
        return str(registry.root), registry.default().model_id
    except RegistryError:
        folder = scratch / "registry"
        model = create_model(None)  # configs/dermanet_default.yaml
        save_checkpoint(folder / "bench-untrained.pt", model, img_size=img_size)
        return str(folder), "bench-untrained (untrained default config, timing only)"


def table(rows: list[tuple[str, LoadResult]], ratios: dict[int, float], ceiling: LoadResult) -> str:
    lines = [
        "| endpoint | batching | concurrency | requests | images/s | runs (images/s) "
        "| vs in-process | p50 ms | p95 ms | p99 ms | client CPU ms/request |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for batching, r in rows:
        client = "–" if r is ceiling else f"{1000 * r.client_cpu_s / r.requests:.1f}"
        spread = ", ".join(f"{rate:.1f}" for rate in r.run_rates) or "one"
        lines.append(
            f"| `{r.label}` | {batching} | {r.concurrency} | {r.requests} | {r.throughput:.1f} "
            f"| {spread} | {r.throughput / ceiling.throughput:.2f}× | {r.percentile(50):.0f} "
            f"| {r.percentile(95):.0f} | {r.percentile(99):.0f} | {client} |"
        )
    lines.append("")
    lines.append(
        "Batching speed-up (images/s on ÷ off): "
        + ", ".join(f"concurrency {c}: {v:.2f}×" for c, v in ratios.items())
    )
    lines.append(
        "In-process rows: concurrency = batch size, latencies per batch. Rows with several "
        "runs show their median run (images/s and latencies); ratios are of medians. Client "
        "CPU: what this benchmark's own HTTP clients spent per request, on the same cores as "
        "Serve."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--model-dir", help="registry (default: $DERMANET_MODEL_DIR, weights/)")
    parser.add_argument("--img-size", type=int, default=224, help="for the fallback checkpoint")
    parser.add_argument("--image-side", type=int, default=512, help="uploaded JPEG side (px)")
    parser.add_argument("--requests", type=int, default=96, help="requests per load level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--gradcam-requests", type=int, default=10)
    parser.add_argument(
        "--in-process-repeats", type=int, default=3, help="in-process runs (the median is used)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of every /v1/classify load level (the median run is reported)",
    )
    parser.add_argument("--num-cpus", type=float, default=4, help="logical CPUs for Ray")
    parser.add_argument("--image", help="upload this file instead of a synthetic lesion")
    parser.add_argument("--backend", help="Serve's model call: auto | torch | onnx (default: the "
                        "Serve setting, auto)")  # fmt: skip
    parser.add_argument(
        "--storage", action="store_true", help="classify with against without storing instead"
    )
    args = parser.parse_args()
    if args.storage:
        storage_benchmark(args)
        return

    scratch = Path(tempfile.mkdtemp(prefix="drn-bench-", dir="/tmp"))
    model_dir, model_note = ensure_registry(args.model_dir, args.img_size, scratch)
    database_url, key = private_account(scratch)
    on = ServeSettings.from_mapping(
        {"model_dir": model_dir, "max_batch_size": args.max_batch_size}
        | {"database_url": database_url, "data_dir": str(scratch)}
        | ({"backend": args.backend} if args.backend else {}),
        base=ServeSettings.from_env(),
    )
    off = ServeSettings.from_mapping({"max_batch_size": 1}, base=on)
    data = Path(args.image).read_bytes() if args.image else test_image(args.image_side)
    ceiling = in_process(
        model_dir, on.backend, data, args.max_batch_size, args.requests, args.in_process_repeats
    )
    rows: list[tuple[str, LoadResult]] = [(f"batch {args.max_batch_size}", ceiling)]
    print(f"in-process: {ceiling.throughput:.1f} img/s")
    try:
        url = start_local(on, port=args.port, num_cpus=args.num_cpus, temp_dir=scratch / "ray")
        for batching, settings in (("on", on), ("off", off)):
            if settings is off:  # same replicas; only the Classifier's user_config changes
                serve.run(build_app(off), name=APP_NAME, route_prefix="/")
                wait_ready(url)
            for concurrency in args.concurrency:
                result = median_run([
                    asyncio.run(
                        run_load(url, "/v1/classify", data, concurrency, args.requests, key)
                    )
                    for _ in range(max(1, args.repeats))
                ])  # fmt: skip
                rows.append((f"{batching} (max {settings.max_batch_size})", result))
                print(f"batching {batching} c={concurrency}: {result.throughput:.1f} img/s")
        gradcam = asyncio.run(run_load(url, "/v1/gradcam", data, 1, args.gradcam_requests, key))
        rows.append(("n/a", gradcam))
        # What HTTP alone costs here: proxy -> Ingress -> answer, no upload, no model call.
        for concurrency in args.concurrency:
            live = asyncio.run(run_load(url, "/healthz/live", None, concurrency, args.requests))
            rows.append(("n/a (transport only)", live))
    finally:
        stop_local()
        shutil.rmtree(scratch, ignore_errors=True)

    by_key = {(b.split()[0], r.concurrency): r for b, r in rows if r.label == "/v1/classify"}
    ratios = {
        c: by_key[("on", c)].throughput / by_key[("off", c)].throughput for c in args.concurrency
    }
    print()
    print(
        f"{time.strftime('%Y-%m-%d')}, {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} CPU cores, no GPU, model {model_note}, backend {on.backend}, "
        f"{args.image or f'{args.image_side}x{args.image_side} synthetic'} JPEG "
        f"({len(data) / 1024:.0f} KiB), "
        f"statistics over {args.requests} requests per level; Serve modes: "
        + ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in SERVE_MODE_ENV)
    )
    print()
    print(table(rows, ratios, ceiling))
    print(f"\nmedian Grad-CAM latency: {statistics.median(gradcam.latencies_ms):.0f} ms")


async def post_each(
    url: str, headers: dict[str, str], path: str, images: list[bytes], concurrency: int
) -> LoadResult:
    """One POST per image (each sent once) from `concurrency` closed-loop clients."""
    latencies: list[float] = []
    queue = iter(images)  # shared: a client takes the next image when its last answer is in
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=300, limits=limits
    ) as client:

        async def worker() -> None:
            for data in queue:
                started = time.perf_counter()
                response = await client.post(path, files={"file": ("lesion.jpg", data)})
                response.raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)

        cpu_started, started = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        client_cpu = time.process_time() - cpu_started
    return LoadResult(path, concurrency, len(images), seconds, latencies, client_cpu)


def storage_benchmark(args: argparse.Namespace) -> None:
    """Classify against classify-and-store on one Serve; medians of --repeats runs a level."""
    from benchmarks.bench_common import uploads

    scratch = Path(tempfile.mkdtemp(prefix="drn-bench-", dir="/tmp"))
    model_dir, model_note = ensure_registry(args.model_dir, args.img_size, scratch)
    database_url, key = private_account(scratch)
    headers = {"Authorization": f"Bearer {key}"}
    settings = ServeSettings.from_mapping(
        {"model_dir": model_dir, "max_batch_size": args.max_batch_size}
        | {"database_url": database_url, "data_dir": str(scratch / "data")}
        | ({"backend": args.backend} if args.backend else {}),
        base=ServeSettings.from_env(),
    )
    repeats = max(1, args.repeats)
    side = (args.image_side, args.image_side * 3 // 4)
    images, what = uploads(args.requests * repeats * 2 * len(args.concurrency) + 8, side)
    warm, images = images[:8], images[8:]
    chunks = (images[i : i + args.requests] for i in range(0, len(images), args.requests))
    runs: dict[tuple[str, int], list[LoadResult]] = {}
    try:
        url = start_local(settings, port=args.port, num_cpus=args.num_cpus,
                          temp_dir=scratch / "ray")  # fmt: skip
        made = httpx.post(f"{url}/v1/cases", headers=headers, timeout=60,
                          json={"patient": "BENCH-1", "lesion": "L1"})  # fmt: skip
        made.raise_for_status()
        paths = {"classify": "/v1/classify", "store": f"/v1/cases/{made.json()['case_id']}/images"}
        for kind, path in paths.items():  # warm-up: models loaded, the database file opened
            asyncio.run(post_each(url, headers, path, warm[:4] if kind == "classify"
                                  else warm[4:], 2))  # fmt: skip
        for concurrency in args.concurrency:
            for _ in range(repeats):  # alternating, so drift on a shared machine hits both
                for kind, path in paths.items():
                    result = asyncio.run(post_each(url, headers, path, next(chunks), concurrency))
                    runs.setdefault((kind, concurrency), []).append(result)
                    print(f"{kind} c={concurrency}: {result.throughput:.1f} img/s, "
                          f"p50 {result.percentile(50):.0f} ms")  # fmt: skip
    finally:
        stop_local()
        shutil.rmtree(scratch, ignore_errors=True)
    medians = {key: median_run(value) for key, value in runs.items()}
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {platform.node() or 'this machine'}: {os.cpu_count()} "
        f"CPU cores, load average {', '.join(f'{v:.1f}' for v in os.getloadavg())} at the end, "
        f"model {model_note}, backend {settings.backend}, {what}, {args.requests} requests a "
        f"run, median of {repeats} runs; SQLite in the data folder\n"
    )
    print("| concurrency | classify images/s | store images/s | store ÷ classify "
          "| classify p50 ms | store p50 ms | p50 added |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.concurrency:
        plain, stored = medians[("classify", c)], medians[("store", c)]
        added = stored.percentile(50) / plain.percentile(50) - 1
        print(
            f"| {c} | {plain.throughput:.1f} | {stored.throughput:.1f} "
            f"| {stored.throughput / plain.throughput:.2f}× | {plain.percentile(50):.0f} "
            f"| {stored.percentile(50):.0f} | {added:+.0%} |"
        )


if __name__ == "__main__":
    main()
