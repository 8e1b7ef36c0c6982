"""Training images/s: the compute ceiling, a plain PyTorch loop, and jobs/train.py on Ray Train.

    .venv/bin/python -m benchmarks.train_throughput --shards /tmp/dn/shards160 --img-size 80 \\
        --model-config configs/dermanet_small.yaml --epochs 3

Rows, all with the same model, image size and global batch:
- ceiling: forward + backward + optimiser step on random tensors in one process with all cores
  (no data, no validation), with and without channels-last: what the machine can do;
- plain loop: one process, a 2-worker DataLoader decoding the same shards' JPEGs with the same
  decode + augment function, no validation;
- jobs/train.py layouts (Ray Train + Ray Data, validation included): 2 workers x 1 thread,
  1 worker x 2 threads. "train img/s" counts training batches only (dermanet.train.throughput);
  "end to end" divides the epoch's training images by its whole wall time, validation and
  data start-up included - what the target (>= 0.8x the ceiling) is about.
Medians over epochs (the first epoch is dropped when there are 3 or more). Prints a table.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dermanet.data.pipelines import decode_transform_batch
from dermanet.data.shards import shard_dir
from dermanet.data.transforms import normalize_images
from dermanet.models import create_model
from dermanet.train.optim import build_optimizer


def ceiling(args: argparse.Namespace, channels_last: bool) -> list[float]:
    """Pure compute: random tensors, one process, all cores."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = create_model(args.model_config).train()
    batch = args.batch_size * 2
    x = torch.randn(batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 8, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    rates = []
    for _ in range(args.epochs + 1):
        started = time.perf_counter()
        for _ in range(args.steps):
            loss = F.cross_entropy(model(x).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(args.steps * batch / (time.perf_counter() - started))
    return rates[1:]


class ShardBatches(Dataset):
    """Batches of shard rows decoded and augmented by the training pipeline's own function."""

    def __init__(self, table: pd.DataFrame, img_size: int, batch_size: int):
        self.table, self.img_size, self.batch_size = table, img_size, batch_size

    def __len__(self) -> int:
        return len(self.table) // self.batch_size

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        rows = self.table.iloc[i * self.batch_size : (i + 1) * self.batch_size]
        batch = {k: rows[k].to_numpy() for k in ("jpeg", "label_index", "index")}
        return decode_transform_batch(batch, "train", self.img_size)


def plain_loop(args: argparse.Namespace) -> list[float]:
    """One process, all threads, a 2-worker DataLoader over the same shards."""
    torch.set_num_threads(os.cpu_count() or 1)
    table = (
        pq.read_table(shard_dir(args.shards, "train")).to_pandas().sample(frac=1, random_state=0)
    )
    loader = DataLoader(
        ShardBatches(table, args.img_size, args.batch_size * 2), batch_size=None, num_workers=2
    )
    model = create_model(args.model_config).train().to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    rates = []
    for _ in range(args.epochs):
        started, images = time.perf_counter(), 0
        for batch in loader:
            x = normalize_images(torch.from_numpy(batch["image"]))
            loss = F.cross_entropy(
                model(x.contiguous(memory_format=torch.channels_last)).logits,
                torch.from_numpy(batch["label"]),
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += len(batch["label"])
        rates.append(images / (time.perf_counter() - started))
    return rates


def train_job(args: argparse.Namespace, workers: int, threads: int) -> tuple[list, list]:
    """jobs/train.py's code path (run_training): (train img/s, end-to-end img/s) per epoch."""
    from dermanet.runtime import init_ray
    from dermanet.train.settings import TrainSettings
    from dermanet.train.supervised import run_training

    init_ray(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="dermanet-bench-train-")
    atexit.register(shutil.rmtree, storage, ignore_errors=True)  # its checkpoints
    outcome = run_training(
        TrainSettings(
            shards=args.shards,
            model_config=args.model_config,
            img_size=args.img_size,
            batch_size=args.batch_size * 2 // workers,
            epochs=args.epochs,
            storage_path=storage,
            name=f"bench-{workers}w{threads}t",
            num_workers=workers,
            cpus_per_worker=0.5 * threads,
            torch_threads=threads,
            channels_last=True,
        )
    )
    history = pd.read_csv(Path(outcome.output) / "logs" / "metrics.csv")
    images = pq.read_table(shard_dir(args.shards, "train"), columns=["index"]).num_rows
    return (
        history["perf/train_images_per_sec"].tolist(),
        (images / history["perf/epoch_seconds"]).tolist(),
    )


def median(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) >= 3 else rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", required=True, help="prepared shards (jobs/prepare_data.py)")
    p.add_argument("--img-size", type=int, default=80, help="training image size")
    p.add_argument("--batch-size", type=int, default=32, help="per worker with 2 workers")
    p.add_argument("--epochs", type=int, default=3, help="epochs (rates) per row")
    p.add_argument("--steps", type=int, default=20, help="ceiling: steps per measurement")
    p.add_argument("--model-config", default="configs/dermanet_small.yaml", help="model YAML")
    p.add_argument(
        "--rows", nargs="+", default=["ceiling", "plain", "2x1", "1x2"],
        choices=["ceiling", "plain", "2x1", "1x2"], help="which rows to measure",
    )  # fmt: skip
    args = p.parse_args(argv)
    rows: dict[str, tuple[float, float | None]] = {}
    if "ceiling" in args.rows:
        rows["ceiling, fp32"] = (median(ceiling(args, False)), None)
        rows["ceiling, channels-last"] = (median(ceiling(args, True)), None)
    if "plain" in args.rows:
        rows["plain loop (DataLoader, 2 decode workers)"] = (median(plain_loop(args)), None)
    for layout in ("2x1", "1x2"):
        if layout in args.rows:
            workers, threads = (int(v) for v in layout.split("x"))
            train, end_to_end = train_job(args, workers, threads)
            rows[f"jobs/train.py, {workers} worker(s) x {threads} thread(s)"] = (
                median(train), median(end_to_end)
            )  # fmt: skip
    reference = rows.get("ceiling, channels-last", (float("nan"),))[0]
    print(f"\n{args.model_config}, {args.img_size} px, global batch {args.batch_size * 2}, "
          f"median over epochs; ratios to the channels-last ceiling\n")  # fmt: skip
    print("| row | train img/s | end to end img/s | end to end / ceiling |")
    print("|---|---|---|---|")
    for name, (train, e2e) in rows.items():
        e2e_text = f"{e2e:.0f}" if e2e is not None else "–"
        ratio = f"{(e2e if e2e is not None else train) / reference:.2f}x"
        print(f"| {name} | {train:.0f} | {e2e_text} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
