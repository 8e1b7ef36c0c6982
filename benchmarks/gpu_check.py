"""One command that checks a GPU machine end to end: training images/s against the GPU's
ceiling, and the shipped model served on the GPU.

    .venv/bin/python -m benchmarks.gpu_check                    # one CUDA GPU, ~3-5 minutes
    .venv/bin/python -m benchmarks.gpu_check --dry-run          # the same path on the CPU, tiny

1. Training through the real path: jobs/train.py's `run_training` (Ray Data decode + augment,
   Ray Train, Lightning) with the default full-width model (configs/dermanet_default.yaml) at
   224 px, bf16-mixed, channels-last, one GPU worker, a fixed number of optimiser steps over
   SYNTHETIC lesions (drawn once, the files repeated so decoding costs what real JPEGs of that
   size cost), validated after the last epoch only. End-to-end images/s = an epoch's training
   images / its wall time, the median over the epochs between the first (start-up) and the
   last (validation).
2. The ceiling: forward + backward + optimiser step of the same model, batch, image size,
   precision and memory format on random tensors already on the GPU (no data).
3. Serving: the shipped model (weights/default.pt) under serve/config.yaml's application on a
   private local Ray + Serve, Classifier and Grad-CAM replicas holding a share of the GPU
   (`num_gpus`, as a cluster's Serve config would set it), and a short closed-loop load run
   of /v1/classify (benchmarks/serve_load.py's client).

Writes a JSON (--out) and prints a Markdown table. --dry-run: tiny model, 64 px, a few steps,
the CPU, a short load run (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from benchmarks.serve_load import run_load, test_image
from dermanet.data.synthetic import generate_synthetic_dataset
from dermanet.models import create_model
from dermanet.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
WEIGHTS = ROOT / "weights"
GPU_SHARES = {"Classifier": 0.4, "GradCam": 0.2}  # 2 Classifier replicas + Grad-CAM: one GPU


@dataclass
class Plan:
    """What one run measures; the GPU plan unless --dry-run."""

    device: str
    model_config: str
    img_size: int
    batch_size: int
    steps: int
    epochs: int
    unique_images: int
    requests: int
    concurrency: int
    precision: str = "bf16-mixed"
    channels_last: bool = True
    ceiling_steps: int = 30

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.steps // self.epochs)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.dry_run:
        return Plan(
            device="cpu", model_config=str(ROOT / "configs" / "dermanet_tiny.yaml"),
            img_size=64, batch_size=8, steps=6, epochs=2, unique_images=32, requests=8,
            concurrency=2, ceiling_steps=3,
        )  # fmt: skip
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU visible; run with --dry-run to check on a CPU")
    if not torch.cuda.is_bf16_supported():
        raise SystemExit(f"gpu_check: {torch.cuda.get_device_name(0)} has no bf16")
    return Plan(
        device="cuda", model_config=str(ROOT / "configs" / "dermanet_default.yaml"),
        img_size=args.img_size, batch_size=args.batch_size, steps=args.steps,
        epochs=args.epochs, unique_images=512, requests=args.requests,
        concurrency=args.concurrency,
    )  # fmt: skip


def synthetic_data(plan: Plan, folder: Path) -> Path:
    """A catalogue of exactly `steps_per_epoch` training batches plus one validation batch:
    `unique_images` drawn lesions, their files repeated under new names."""
    side = max(plan.img_size * 5 // 4, 64)  # decoded and cropped down, like real uploads
    drawn = generate_synthetic_dataset(folder, num_images=plan.unique_images, size=side, seed=0)
    images = folder / "images"
    train_rows = plan.steps_per_epoch * plan.batch_size
    rows = []
    for i in range(train_rows + plan.batch_size):
        source = drawn.iloc[i % len(drawn)]
        name = source["image"] if i < len(drawn) else f"{source['image']}_r{i}"
        if i >= len(drawn):
            os.link(images / f"{source['image']}.jpg", images / f"{name}.jpg")
        split = "train" if i < train_rows else "val"
        rows.append({"image": name, "label": source["label"], "lesion_id": f"L{i}",
                     "split": split})  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / "catalogue.csv", index=False)
    return folder / "catalogue.csv"


def train(plan: Plan, csv: Path, storage: Path) -> dict[str, Any]:
    """jobs/train.py's code path on one worker: images/s per epoch from its metrics.csv."""
    from dermanet.runtime import init_ray
    from dermanet.train.settings import TrainSettings
    from dermanet.train.supervised import run_training

    gpu = plan.device == "cuda"
    init_ray(num_cpus=None if gpu else 4, include_dashboard=False, log_to_driver=False)
    settings = TrainSettings(
        csv=str(csv), images=str(csv.parent / "images"), model_config=plan.model_config,
        img_size=plan.img_size, batch_size=plan.batch_size, epochs=plan.epochs,
        warmup_epochs=0, val_every=plan.epochs, precision=plan.precision,
        channels_last=plan.channels_last, use_gpu=gpu, num_workers=1,
        cpus_per_worker=2 if gpu else 0.5, torch_threads=2 if gpu else 1,
        storage_path=str(storage), name="gpu-check", max_failures=0,
    )  # fmt: skip
    started = time.perf_counter()
    outcome = run_training(settings)
    wall = time.perf_counter() - started
    history = pd.read_csv(Path(outcome.output) / "logs" / "metrics.csv")
    images = plan.steps_per_epoch * plan.batch_size
    end_to_end = (images / history["perf/epoch_seconds"]).tolist()
    measured = end_to_end[1:-1] or end_to_end  # not the start-up nor the validated epoch
    return {
        "end_to_end_images_per_s": statistics.median(measured),
        "train_batches_images_per_s": statistics.median(
            history["perf/train_images_per_sec"].tolist()[1:-1]
            or history["perf/train_images_per_sec"].tolist()
        ),
        "epochs_end_to_end_images_per_s": end_to_end,
        "steps": plan.steps_per_epoch * plan.epochs,
        "job_wall_s": wall,
    }


def ceiling(plan: Plan) -> dict[str, Any]:
    """Forward + backward + step on random tensors on the device: the model's own limit."""
    device = torch.device(plan.device)
    model = create_model(plan.model_config).train().to(device)
    x = torch.randn(plan.batch_size, 3, plan.img_size, plan.img_size, device=device)
    y = torch.randint(0, 8, (plan.batch_size,), device=device)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)

    def steps(count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            with torch.autocast(device.type, dtype=torch.bfloat16):  # = bf16-mixed
                loss = F.cross_entropy(model(x).logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    steps(max(2, plan.ceiling_steps // 5))  # warm-up: kernels chosen, memory allocated
    seconds = steps(plan.ceiling_steps)
    return {"images_per_s": plan.ceiling_steps * plan.batch_size / seconds}


def serve_config(
    plan: Plan, model_dir: Path, port: int, database_url: str, data_dir: Path
) -> dict[str, Any]:
    """serve/config.yaml's application on the shipped registry and a private case database,
    GPU shares on a GPU."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {**config["http_options"], "port": port}
    (app,) = config["applications"]
    app["args"] |= {"model_dir": str(model_dir), "default_model": "default", "backend": "torch",
                    "database_url": database_url, "data_dir": str(data_dir)}  # fmt: skip
    for deployment in app["deployments"]:
        if deployment["name"] in GPU_SHARES:
            share = GPU_SHARES[deployment["name"]] if plan.device == "cuda" else 0
            deployment["ray_actor_options"]["num_gpus"] = share
    return config


def serve(plan: Plan, scratch: Path) -> dict[str, Any]:
    """The shipped model on a private Serve (this process's Ray) under a short load, signed in
    with an account of its own database in `scratch`."""
    import ray
    from ray import serve as ray_serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from dermanet.serving.runner import free_port, private_account, wait_ready

    scratch.mkdir(parents=True, exist_ok=True)
    database_url, key = private_account(scratch)
    port = free_port()
    config = serve_config(plan, WEIGHTS, port, database_url, scratch)
    ray_serve.start(http_options=config["http_options"])
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 300)  # Serve goes with this process's private Ray (main's ray.shutdown)
    gpus_held = ray.cluster_resources().get("GPU", 0) - ray.available_resources().get("GPU", 0)
    data = test_image(512)
    load = run_load(url, "/v1/classify", data, plan.concurrency, plan.requests, key=key)
    result = asyncio.run(load)
    return {
        "model": "weights/default.pt",
        "concurrency": plan.concurrency,
        "requests": plan.requests,
        "images_per_s": result.throughput,
        "p50_ms": result.percentile(50),
        "p95_ms": result.percentile(95),
        "gpus_held_by_replicas": gpus_held,
    }


def device_name(plan: Plan) -> str:
    if plan.device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores)"


def table(report: dict[str, Any]) -> str:
    t, c, s = report["train"], report["ceiling"], report["serve"]
    return "\n".join([
        f"{report['device_name']}: {Path(report['plan']['model_config']).name}, "
        f"{report['plan']['img_size']} px, batch {report['plan']['batch_size']}, "
        f"{report['plan']['precision']}, channels-last, {t['steps']} steps",
        "",
        "| measurement | images/s | vs ceiling |",
        "|---|---:|---:|",
        f"| ceiling: forward + backward on device tensors | {c['images_per_s']:.0f} | 1.00× |",
        f"| jobs/train.py end to end (Ray Data + Ray Train) | "
        f"{t['end_to_end_images_per_s']:.0f} | {report['end_to_end_vs_ceiling']:.2f}× |",
        f"| jobs/train.py training batches only | {t['train_batches_images_per_s']:.0f} | "
        f"{t['train_batches_images_per_s'] / c['images_per_s']:.2f}× |",
        f"| Serve /v1/classify, concurrency {s['concurrency']} ({s['requests']} requests, "
        f"p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, GPUs held "
        f"{s['gpus_held_by_replicas']:g}) | {s['images_per_s']:.1f} | – |",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dry-run", action="store_true", help="tiny model, 64 px, few steps, CPU")
    p.add_argument("--img-size", type=int, default=224, help="training image side (px)")
    p.add_argument("--batch-size", type=int, default=128, help="images per optimiser step")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps in all")
    p.add_argument("--epochs", type=int, default=4, help="epochs the steps are cut into")
    p.add_argument("--requests", type=int, default=256, help="/v1/classify requests")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    p.add_argument("--out", default="gpu_check.json", help="JSON report")
    args = p.parse_args(argv)
    plan = make_plan(args)
    scratch = Path(tempfile.mkdtemp(prefix="dn-gpucheck-", dir="/tmp"))
    try:
        csv = synthetic_data(plan, scratch / "data")
        report: dict[str, Any] = {"plan": asdict(plan), "device_name": device_name(plan)}
        report["ceiling"] = ceiling(plan)
        if plan.device == "cuda":
            torch.cuda.empty_cache()  # the ceiling's GPU memory back for the training worker
        report["train"] = train(plan, csv, scratch / "runs")
        report["end_to_end_vs_ceiling"] = (
            report["train"]["end_to_end_images_per_s"] / report["ceiling"]["images_per_s"]
        )
        report["serve"] = serve(plan, scratch / "serve")
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nreport: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
