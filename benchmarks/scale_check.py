"""Scale check: BYOL and fine-tune on 1 and 2 Ray Train workers, all-reduce cost, decode rate.

    .venv/bin/python -m benchmarks.scale_check --shards /tmp/dn/derm-shards \\
        --train-images 1200 --img-size 64 --epochs 2

Runs the real jobs' drivers (`run_training` through benchmarks/train_throughput.py's
`ray_train_rates`, and `run_pretraining`) on a class-stratified subset of prepared derm-sample
shards, with 1 and with 2 workers, and reads the per-epoch `perf/train_images_per_sec` (all
workers together; first batch and validation excluded) from `<run>/logs/metrics.csv`.
Also measures:
  - the all-reduce: `torch.distributed.all_reduce` of a flat float32 tensor the size of each
    model's trainable parameters between 2 gloo processes (what DDP moves per step; DDP buckets
    it and overlaps it with the backward pass, so this is an upper bound on the exposed cost);
  - the decode + augment rate of one CPU core (`decode_transform_batch`, one process), the
    number the 8-GPU estimate in docs/benchmarks.md rests on.
Prints Markdown tables (CPU workers; GPU runs are the jobs' own --use-gpu).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.train_throughput import ray_train_rates
from dermanet.data.pipelines import decode_transform_batch
from dermanet.data.shards import read_manifest, shard_dir
from dermanet.models import create_model
from dermanet.models.byol import BYOL
from dermanet.runtime import init_ray
from dermanet.storage import write_json
from dermanet.train.pretrain import PretrainSettings, run_pretraining

SUBSET_FRACTIONS = {"train": 1.0, "val": 0.2, "test": 0.1}  # of --train-images


def subset_shards(source: str, target: str, train_images: int, seed: int = 0) -> dict:
    """A class-stratified subset of prepared shards (every class kept, >= 2 images each)."""
    manifest = read_manifest(source)
    total_train = sum(manifest["counts"]["train"].values())
    counts = {}
    for split, share in SUBSET_FRACTIONS.items():
        table = pads.dataset(shard_dir(source, split), format="parquet").to_table()
        frame = table.to_pandas()
        fraction = min(1.0, train_images * share / total_train)
        keep = [
            i
            for _, group in frame.groupby("label")
            for i in group.sample(n=max(2, round(len(group) * fraction)), random_state=seed).index
        ]
        sample = frame.loc[keep]
        out = Path(shard_dir(target, split))
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(sample, preserve_index=False), out / "part-0.parquet")
        counts[split] = {k: int(v) for k, v in sample["label"].value_counts().sort_index().items()}
    write_json(
        f"{target}/manifest.json",
        {**manifest, "counts": counts, "written": sum(sum(c.values()) for c in counts.values())},
    )
    return counts


def byol_rates(shards: str, workers: int, args: argparse.Namespace) -> list[float]:
    storage = tempfile.mkdtemp(prefix="dermanet-bench-byol-")
    atexit.register(shutil.rmtree, storage, ignore_errors=True)
    settings = PretrainSettings(
        shards=shards,
        shard_splits=["train"],
        model_config=args.model_config,
        img_size=args.img_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        proj_hidden_dim=args.proj_hidden_dim,
        pred_hidden_dim=args.proj_hidden_dim,
        proj_out_dim=128,
        storage_path=storage,
        name=f"byol-{workers}w",
        num_workers=workers,
        cpus_per_worker=0.5,
    )
    outcome = run_pretraining(settings)
    history = pd.read_csv(outcome.metrics_csv)
    return history["perf/train_images_per_sec"].dropna().tolist()


def trainable_parameters(args: argparse.Namespace) -> dict[str, int]:
    classifier = create_model(args.model_config)
    byol = BYOL(
        create_model(args.model_config),
        proj_hidden_dim=args.proj_hidden_dim,
        proj_out_dim=128,
        pred_hidden_dim=args.proj_hidden_dim,
    )
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    online = count(byol) - sum(
        p.numel() for n, p in byol.named_parameters() if p.requires_grad and "target" in n
    )
    return {"fine-tune": count(classifier), "BYOL (online net)": online}


def _allreduce_worker(rank: int, port: int, numel: int, repeats: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    grad = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(grad)
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(grad)
        times.append(time.perf_counter() - start)
    if rank == 0:
        out["seconds"] = statistics.median(times)
    dist.destroy_process_group()


def allreduce_seconds(numel: int, repeats: int = 20) -> float:
    """Median wall time of one 2-process gloo all_reduce of `numel` float32 values."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_allreduce_worker, args=(port, numel, repeats, out), nprocs=2, join=True)
    return float(out["seconds"])


def decode_rate_per_core(shards: str, img_size: int, mode: str, images: int = 384) -> float:
    """Images/s of decode + augment in this one process with one thread (one CPU core)."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    table = pads.dataset(shard_dir(shards, "train"), format="parquet").head(images)
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in ("jpeg", "index", "label_index")}
    decode_transform_batch({k: v[:32] for k, v in batch.items()}, mode, img_size)  # warm up
    start = time.perf_counter()
    for i in range(0, len(table), 64):
        decode_transform_batch({k: v[i : i + 64] for k, v in batch.items()}, mode, img_size)
    return len(table) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="prepared derm-sample shards")
    p.add_argument("--train-images", type=int, default=1200, help="training images in the subset")
    p.add_argument("--img-size", type=int, default=64, help="training image side")
    p.add_argument("--batch-size", type=int, default=32, help="batch per worker")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run (one rate each)")
    p.add_argument("--model-config", default="configs/dermanet_tiny.yaml", help="model YAML")
    p.add_argument("--proj-hidden-dim", type=int, default=512, help="BYOL projector/predictor")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--decode-sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--skip", nargs="*", default=[], choices=["finetune", "byol", "allreduce"])
    p.add_argument("--json", help="also write the raw numbers here")
    args = p.parse_args(argv)

    subset = tempfile.mkdtemp(prefix="dermanet-scale-shards-")
    atexit.register(shutil.rmtree, subset, ignore_errors=True)
    counts = subset_shards(args.shards, subset, args.train_images)
    init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    results: dict[str, dict[int, list[float]]] = {}
    use_gpu = torch.cuda.is_available()
    for job, run in (("fine-tune", ray_train_rates), ("BYOL", byol_rates)):
        if ("finetune" if job == "fine-tune" else "byol") in args.skip:
            continue
        results[job] = {w: run(subset, w, args) for w in (1, 2)}
    params = trainable_parameters(args)
    allreduce = (
        {} if "allreduce" in args.skip else {k: allreduce_seconds(n) for k, n in params.items()}
    )
    decode = {
        (mode, size): decode_rate_per_core(subset, size, mode)
        for size in sorted({args.img_size, *args.decode_sizes})
        for mode in ("train", "two_view")
    }

    n_train = sum(counts["train"].values())
    host = f"{platform.node()}, {os.cpu_count()} CPU cores, {'GPU' if use_gpu else 'no GPU'}"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n{datetime.date.today()}; {host}; load average at the end (1/5/15 min): {load}.")
    print(f"{n_train} training images (stratified subset of {args.shards}), {args.img_size} px, "
          f"batch {args.batch_size}/worker, {args.model_config}, {args.epochs} epochs per run, "
          f"Ray with {args.num_cpus} logical CPUs, 0.5 CPU per Train worker\n")  # fmt: skip
    print("| job | workers | images/s, all workers (median) | per worker | per epoch | "
          "2-worker speed-up |")  # fmt: skip
    print("|---|---:|---:|---:|---|---:|")
    summary = {}
    for job, by_workers in results.items():
        one = statistics.median(by_workers[1])
        for w in (1, 2):
            total = statistics.median(by_workers[w])
            epochs = ", ".join(f"{r:.0f}" for r in by_workers[w])
            speed = f"{total / one:.2f}×" if w == 2 else "1.00×"
            print(f"| {job} | {w} | {total:.0f} | {total / w:.0f} | {epochs} | {speed} |")
            summary[f"{job}/{w}"] = total
    if allreduce:
        print("\n| model | trainable params | gradient MB | gloo all-reduce, 2 procs (ms) | "
              "share of a 2-worker step |")  # fmt: skip
        print("|---|---:|---:|---:|---:|")
        for job, seconds in allreduce.items():
            key = "fine-tune" if job == "fine-tune" else "BYOL"
            step = args.batch_size / (summary[f"{key}/2"] / 2) if f"{key}/2" in summary else None
            share = f"{100 * seconds / step:.1f} %" if step else "n/a"
            print(f"| {job} | {params[job]:,} | {params[job] * 4 / 1e6:.2f} | "
                  f"{seconds * 1e3:.2f} | {share} |")  # fmt: skip
    print("\n| decode + augment, 1 core | " + " | ".join(f"{m} {s}px" for m, s in decode) + " |")
    print("|---|" + "---:|" * len(decode))
    print("| images/s | " + " | ".join(f"{r:.0f}" for r in decode.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rates": {j: {str(w): r for w, r in d.items()} for j, d in results.items()},
            "params": params, "allreduce_s": allreduce,
            "decode_per_core": {f"{m}/{s}": r for (m, s), r in decode.items()},
            "counts": counts,
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
