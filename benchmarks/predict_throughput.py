"""Batch inference throughput: jobs/predict.py (Ray Data) vs a plain loop vs sequential HTTP.

    .venv/bin/python -m benchmarks.predict_throughput                 # 600 images, 3 rounds
    .venv/bin/python -m benchmarks.predict_throughput --tiny          # smoke check, no numbers

Same model (weights/default.pt unless --model), same real derm-sample images, two sizes:
derm-sample's 341x256 files as they are, and 600x450 upscaled copies (HAM10000's original size)
written to a temporary folder. Methods, each end to end (files in, result rows out):
- plain loop: one process, Predictor.decode + Predictor.predict_batch per batch, every core;
- jobs/predict.py (`run_prediction`) on a local Ray with the machine's cores: 1 model worker
  (1 CPU) with read+prepare tasks of 1 or 0.5 CPU (one or two at a time beside the worker on
  2 cores), the same worker with 2 model threads (`--threads-per-worker 2`: the model may use
  the core decoding leaves idle), and 2 model workers of 0.5 CPU; the time includes starting
  the workers
  (`startup` = the same run on one batch);
- sequential HTTP: one POST /v1/classify at a time to a private Serve (default replicas).
The plain loop and the job use the same --backend (auto: ONNX Runtime on a CPU, as Serve).
Medians of --repeats rounds, methods interleaved per round. Prints Markdown tables for
docs/benchmarks.md (throughput; where the plain loop's time goes). Refuses to measure a busy
machine (`bench_common.refuse_if_busy`; --allow-busy overrides); --tiny checks the script only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pandas as pd
import torch
from PIL import Image

from benchmarks.bench_common import refuse_if_busy
from dermanet.inference import ModelRegistry, Predictor
from dermanet.inference.batch import PredictSettings, prediction_row, resolve_model, run_prediction
from dermanet.inference.predictor import BACKENDS
from dermanet.paths import sample_available, sample_dir

UPSCALED = (600, 450)
RAY_CONFIGS = {  # label: (model workers, CPUs per worker, CPUs per read+prepare task, threads)
    "jobs/predict.py, 1 worker, 1-CPU tasks": (1, 1.0, 1.0, 0),
    "jobs/predict.py, 1 worker, 2 threads, 1-CPU tasks": (1, 1.0, 1.0, 2),
    "jobs/predict.py, 1 worker, 0.5-CPU tasks": (1, 1.0, 0.5, 0),
    "jobs/predict.py, 2 workers, 0.5-CPU tasks": (2, 0.5, 0.5, 0),
}


def pick_images(count: int) -> list[Path]:
    """derm-sample's 341x256 images (the ISIC archive ones), in id order."""
    table = pd.read_csv(sample_dir() / "metadata.csv")
    chosen = table.loc[(table["width"] == 341) & (table["height"] == 256), "image"].sort_values()
    if len(chosen) < count:
        sys.exit(f"derm-sample has {len(chosen)} 341x256 images, fewer than --num-images {count}")
    return [sample_dir() / "images" / f"{image}.jpg" for image in chosen.iloc[:count]]


def upscaled_copies(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths:
        target = folder / path.name
        Image.open(path).convert("RGB").resize(UPSCALED, Image.BICUBIC).save(target, quality=90)
        copies.append(target)
    return copies


def path_list(paths: list[Path], csv: Path) -> str:
    pd.DataFrame({"path": [str(p) for p in paths]}).to_csv(csv, index=False)
    return str(csv)


def plain_loop(predictor: Predictor, paths: list[Path], batch_size: int, out: Path) -> float:
    """Seconds for files -> rows -> Parquet in one process (the baseline)."""
    started = time.perf_counter()
    rows = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        images = [predictor.decode(p.read_bytes()) for p in chunk]
        for path, prediction in zip(chunk, predictor.predict_batch(images), strict=True):
            rows.append({"path": str(path), **prediction_row(prediction, embeddings=False)})
    pd.DataFrame(rows).to_parquet(out)
    return time.perf_counter() - started


def profile(predictor: Predictor, paths: list[Path], batch_size: int) -> dict[str, float]:
    """ms per image of each step of the plain loop, on its first 4 batches: read + decode,
    preprocessing (`to_tensor`), the model (`forward` minus preprocessing), and the rest of
    `predict_batch` (quality checks, OOD score, prediction set, risk)."""
    spent = dict.fromkeys(("read + decode", "preprocess", "model", "gate + answer"), 0.0)
    count = 0
    for start in range(0, min(len(paths), 4 * batch_size), batch_size):
        chunk = paths[start : start + batch_size]
        t0 = time.perf_counter()
        images = [predictor.decode(p.read_bytes()) for p in chunk]
        t1 = time.perf_counter()
        predictor.to_tensor(images)
        t2 = time.perf_counter()
        predictor.forward(images)
        t3 = time.perf_counter()
        predictor.predict_batch(images)
        t4 = time.perf_counter()
        spent["read + decode"] += t1 - t0
        spent["preprocess"] += t2 - t1
        spent["model"] += (t3 - t2) - (t2 - t1)
        spent["gate + answer"] += (t4 - t3) - (t3 - t2)
        count += len(chunk)
    return {step: 1000 * seconds / count for step, seconds in spent.items()}


def ray_job(settings: PredictSettings) -> float:
    started = time.perf_counter()
    run_prediction(settings)
    return time.perf_counter() - started


def sequential_http(url: str, paths: list[Path]) -> float:
    with httpx.Client(base_url=url, timeout=120) as client:
        started = time.perf_counter()
        for path in paths:
            response = client.post("/v1/classify", files={"file": (path.name, path.read_bytes())})
            response.raise_for_status()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=600, help="images per size")
    parser.add_argument("--http-images", type=int, default=150, help="images sent over HTTP")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default=None, help="registry id or .pt (default: default)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="model call of the plain loop and the job (auto: ONNX Runtime on "
                        "a CPU, as Serve)")  # fmt: skip
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs for Ray")
    parser.add_argument("--tiny", action="store_true", help="a few images: checks the script")
    parser.add_argument(
        "--allow-busy", action="store_true", help="measure even if the machine is already busy"
    )
    args = parser.parse_args()
    if args.tiny:
        args.num_images, args.http_images, args.repeats = 2 * args.batch_size, 8, 1
    load_before = refuse_if_busy(args.allow_busy or args.tiny)
    if not sample_available():
        sys.exit(f"derm-sample not found at {sample_dir()}: the benchmark uses its real images")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from dermanet.runtime import init_ray
    from dermanet.serving import ServeSettings
    from dermanet.serving.runner import free_port, start_local, stop_local

    work = Path(tempfile.mkdtemp(prefix="predict-bench-", dir="/tmp"))
    try:
        originals = pick_images(args.num_images)
        sizes = {
            "341x256": originals,
            "600x450": upscaled_copies(originals, work / "600x450"),
        }
        model = resolve_model(args.model)
        predictor = Predictor(model.loaded, backend=args.backend)
        init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)

        def settings(
            paths_csv: str, workers: int, cpus: float, task_cpus: float, threads: int
        ) -> PredictSettings:
            return PredictSettings(
                input=paths_csv, output=str(work / "out.parquet"), overwrite=True,
                model=args.model, batch_size=args.batch_size, num_workers=workers,
                cpus_per_worker=cpus, decode_cpus=task_cpus, backend=args.backend,
                threads_per_worker=threads,
            )  # fmt: skip

        inputs = {size: path_list(paths, work / f"{size}.csv") for size, paths in sizes.items()}
        one_batch = {
            size: path_list(paths[: args.batch_size], work / f"{size}-one.csv")
            for size, paths in sizes.items()
        }
        methods: dict[str, Callable[[str], float]] = {
            "plain loop": lambda size: plain_loop(predictor, sizes[size], args.batch_size,
                                                  work / "plain.parquet"),
        }  # fmt: skip
        for label, config in RAY_CONFIGS.items():
            methods[label] = lambda size, c=config: ray_job(settings(inputs[size], *c))
        ray_job(settings(one_batch["341x256"], 1, 1.0, 1.0, 0))  # warm-up: Ray's worker processes
        seconds: dict[tuple[str, str], list[float]] = {}
        startup: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.repeats):
            for size in sizes:
                for label, method in methods.items():
                    seconds.setdefault((size, label), []).append(method(size))
                    print(f"round {round_ + 1} {size} {label}: "
                          f"{seconds[(size, label)][-1]:.2f} s", flush=True)  # fmt: skip
                for label, config in RAY_CONFIGS.items():
                    job = settings(one_batch[size], *config)
                    startup.setdefault((size, label), []).append(ray_job(job))
        steps = {size: profile(predictor, paths, args.batch_size) for size, paths in sizes.items()}
        # Sequential HTTP last: Serve's replicas hold CPUs the Ray Data workers need.
        torch_threads = torch.get_num_threads()
        url = start_local(ServeSettings(model_dir=str(_registry_dir(args.model, work))),
                          port=free_port())  # fmt: skip
        http_label = "sequential HTTP (Serve)"
        for _ in range(args.repeats):
            for size, paths in sizes.items():
                sent = paths[: args.http_images]
                seconds.setdefault((size, http_label), []).append(sequential_http(url, sent))
        stop_local()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    counts = {label: args.num_images for label in methods} | {http_label: args.http_images}
    print(report(seconds, startup, counts, args, load_before, torch_threads, model.model_id))
    print("\nWhere the plain loop's time goes (ms per image, first 4 batches, "
          f"{torch_threads} torch threads):\n")  # fmt: skip
    print("| image size | " + " | ".join(steps[next(iter(steps))]) + " |")
    print("|---|" + "---|" * len(steps[next(iter(steps))]))
    for size, ms in steps.items():
        print(f"| {size} | " + " | ".join(f"{v:.2f}" for v in ms.values()) + " |")


def _registry_dir(model: str | None, work: Path) -> Path:
    """Serve reads a registry folder: the default one, or a folder holding just --model."""
    if model is None or not model.endswith(".pt"):
        return ModelRegistry().root
    folder = work / "registry"
    folder.mkdir(exist_ok=True)
    shutil.copy(model, folder / "default.pt")
    return folder


def report(seconds, startup, counts, args, load_before, torch_threads, model_id) -> str:
    lines = [
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} CPU cores, no GPU, torch {torch.__version__} ({torch_threads} "
        f"threads in the plain loop); model {model_id!r}, backend {args.backend} (Serve: its "
        f"default); batch {args.batch_size}; medians of "
        f"{args.repeats}; load average before: {load_before}"
        + ("  \n**--tiny: a check of the script, not a measurement**" if args.tiny else ""),
        "",
        "| image size | method | images | images/s | vs plain loop | one-batch run s "
        "| images/s after start-up | vs plain loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size in dict.fromkeys(size for size, _ in seconds):
        base = counts["plain loop"] / statistics.median(seconds[(size, "plain loop")])
        for (s, label), values in seconds.items():
            if s != size:
                continue
            total = statistics.median(values)
            rate = counts[label] / total
            start = startup.get((size, label))
            if start:  # the one-batch run is start-up + one batch: the rest is steady state
                one = statistics.median(start)
                steady = (counts[label] - args.batch_size) / max(total - one, 1e-9)
                extra = f"{one:.1f} | {steady:.1f} | {steady / base:.2f}x"
            else:
                extra = "– | – | –"
            lines.append(f"| {size} | {label} | {counts[label]} | {rate:.1f} | "
                         f"{rate / base:.2f}x | {extra} |")  # fmt: skip
    lines += ["", "Runs (s): " + "; ".join(
        f"{size} {label}: " + ", ".join(f"{v:.2f}" for v in values)
        for (size, label), values in seconds.items()
    )]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
