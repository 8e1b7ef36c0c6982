"""Training images/s: Ray Train (1 and 2 workers) vs a plain single-process PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py --limit 1500 --img-size 96 --epochs 3

Same model config, data (a derm-sample subset), batch size and decode+augment function. The
plain loop reads raw JPEGs with a 2-worker DataLoader; Ray Train reads Parquet shards through
Ray Data. Rates exclude the first batch of each epoch and the validation pass (see
dermanet.train.throughput). Prints a Markdown table with medians over epochs and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from benchmarks.data_throughput import RawJpegBatches
from dermanet.data import assign_splits, read_plain_csv
from dermanet.data.shards import prepare_shards
from dermanet.data.splits import class_weights
from dermanet.data.transforms import normalize_images
from dermanet.models import create_model
from dermanet.paths import sample_available, sample_dir
from dermanet.runtime import init_ray
from dermanet.train.optim import build_optimizer
from dermanet.train.supervised import TrainSettings, run_training


def plain_loop_rates(cat: pd.DataFrame, args: argparse.Namespace) -> list[float]:
    """One rate per epoch of a single-process loop (the baseline)."""
    train = cat.loc[cat["split"] == "train"]
    model = create_model(args.model_config).train()
    weights = torch.tensor(class_weights(cat))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    loader = DataLoader(
        RawJpegBatches(train, args.img_size),
        sampler=BatchSampler(RandomSampler(range(len(train))), args.batch_size, drop_last=True),
        batch_size=None,
        num_workers=2,
    )
    rates = []
    for _ in range(args.epochs):
        images, first_end = 0, None
        for batch in loader:
            loss = F.cross_entropy(
                model(normalize_images(batch["image"])).logits, batch["label"], weight=weights
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if first_end is None:
                first_end = time.perf_counter()
            else:
                images += len(batch["label"])
        rates.append(images / (time.perf_counter() - first_end))
    return rates


def ray_train_rates(shards: str, workers: int, args: argparse.Namespace) -> list[float]:
    storage = tempfile.mkdtemp(prefix="dermanet-bench-train-")
    settings = TrainSettings(
        shards=shards,
        model_config=args.model_config,
        img_size=args.img_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        storage_path=storage,
        name=f"bench-{workers}w",
        num_workers=workers,
        cpus_per_worker=0.5,
    )
    outcome = run_training(settings)
    history = pd.read_csv(Path(outcome.output) / "logs" / "metrics.csv")
    return history["perf/train_images_per_sec"].dropna().tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=1500, help="derm-sample images (all splits)")
    p.add_argument("--img-size", type=int, default=96, help="training image size")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per worker")
    p.add_argument("--epochs", type=int, default=3, help="epochs per variant (one rate each)")
    p.add_argument(
        "--model-config", default="configs/dermanet_default.yaml", help="model config YAML"
    )
    args = p.parse_args(argv)
    if not sample_available():
        print(f"derm-sample not found at {sample_dir()}", file=sys.stderr)
        return 2
    root = sample_dir()
    cat = assign_splits(read_plain_csv(root / "metadata.csv", root / "images"), seed=0)
    cat = cat.sample(n=args.limit, random_state=0)
    init_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    shards = tempfile.mkdtemp(prefix="dermanet-bench-shards-")
    prepare_shards(cat, shards, short_side=max(args.img_size, 128))

    results = {"plain PyTorch loop (1 process, DataLoader 2 workers)": plain_loop_rates(cat, args)}
    for workers in (1, 2):
        results[f"Ray Train, {workers} worker(s), Ray Data shards"] = ray_train_rates(
            shards, workers, args
        )
    baseline = statistics.median(results[next(iter(results))])
    n_train = (cat.split == "train").sum()
    print(f"\n{n_train} training images, {args.img_size}px, batch {args.batch_size}/worker, "
          f"{args.model_config}; median over {args.epochs} epochs\n")  # fmt: skip
    print("| variant | images/s (median) | per epoch | vs plain loop |")
    print("|---|---|---|---|")
    for name, rates in results.items():
        median = statistics.median(rates)
        print(f"| {name} | {median:.1f} | {', '.join(f'{r:.1f}' for r in rates)} | "
              f"{median / baseline:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
