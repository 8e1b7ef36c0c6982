"""Decode + train-time augmentation throughput: DataLoader baseline vs Ray Data (raw, shards).

    .venv/bin/python benchmarks/data_throughput.py --limit 3000 --repeats 3

Needs the real derm-sample (DERMANET_SAMPLE_DIR). Every source runs the same decode+augment
function (`dermanet.data.pipelines.decode_transform_batch`), so the comparison is of the data
movement around it. Each source is built once and streamed once per pass, as training streams
its pipeline every epoch. Prints a Markdown table: median images/s and the ratio to the
baseline, for the whole pass and for the part after the first batch (each column a median of
its own), so a start-up cost shows apart from the rate a long epoch streams at.

`--rows-per-block 256 512` streams the shards once per block size in the same round-robin,
an A/B of the decode-task size that a drifting VM hits alike.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from dermanet.data import assign_splits, label_indices, read_plain_csv
from dermanet.data.pipelines import (
    PipelineConfig,
    build_pipeline,
    decode_transform_batch,
    read_catalogue_files,
    read_shards,
)
from dermanet.data.shards import prepare_shards
from dermanet.data.sources import catalogue_rows
from dermanet.paths import sample_available, sample_dir
from dermanet.runtime import init_ray

SOURCES = ("loader", "raw", "shards")


class RawJpegBatches(Dataset):
    """Baseline: a map-style dataset whose item is a whole batch of raw files."""

    def __init__(self, catalogue: pd.DataFrame, img_size: int):
        self.paths = catalogue["path"].tolist()
        self.labels = label_indices(catalogue).to_numpy()
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = {
            "jpeg": [open(self.paths[i], "rb").read() for i in indices],  # noqa: SIM115
            "label_index": self.labels[indices],
            "index": np.asarray(indices, dtype=np.int64),
        }
        out = decode_transform_batch(batch, "train", self.img_size)
        return {k: torch.from_numpy(v) for k, v in out.items()}


@dataclass(frozen=True)
class Pass:
    """One timed pass: the whole pass, and the part after its first batch arrived."""

    rate: float  # images/s over the whole pass, start-up included
    first_batch_s: float  # seconds until the first batch arrived
    steady_rate: float  # images/s after the first batch: the rate a long epoch settles at


def timed(make_batches: Callable[[], Iterable[dict]]) -> Pass:
    start = time.perf_counter()
    first_at: float | None = None
    first_n = n = 0
    for batch in make_batches():
        n += len(batch["label"])
        if first_at is None:
            first_at, first_n = time.perf_counter(), n
    end = time.perf_counter()
    # A finished pass leaves a few decoded blocks (~37 MiB each at 224 px) mapped by cyclic
    # garbage of Ray Data's iterator in this process: in use, so Ray can neither free nor
    # spill them until Python's cyclic GC runs. Collected here, outside the timing, so one
    # pass's leftovers never crowd the object store of the next.
    gc.collect()
    rate = n / (end - start)
    if first_at is None or n == first_n:  # one batch or none: no "after the first" to time
        return Pass(rate, (first_at or end) - start, rate)
    return Pass(rate, first_at - start, (n - first_n) / (end - first_at))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--limit",
        type=int,
        default=3000,
        help="training images per run; 0 = the whole train split, what one training epoch streams",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="image sizes")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell (median reported)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (baseline)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray")
    p.add_argument(
        "--rows-per-block",
        type=int,
        nargs="+",
        default=[PipelineConfig.rows_per_block],
        help="rows per decode task for the shards source; several = one shards source each",
    )
    p.add_argument(
        "--sources",
        nargs="+",
        choices=SOURCES,
        default=list(SOURCES),
        help="which sources to run (e.g. only 'shards' under a profiler); ratios need 'loader'",
    )
    args = p.parse_args(argv)
    if not sample_available():
        print(f"derm-sample not found at {sample_dir()}: set DERMANET_SAMPLE_DIR", file=sys.stderr)
        return 2

    root = sample_dir()
    cat = assign_splits(read_plain_csv(root / "metadata.csv", root / "images"), seed=0)
    train = cat.loc[cat["split"] == "train"]
    cat = catalogue_rows(train.sample(n=args.limit or len(train), random_state=0))
    init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    shards = tempfile.mkdtemp(prefix="dermanet-bench-")
    atexit.register(shutil.rmtree, shards, ignore_errors=True)  # 62 MB a run otherwise
    prepare_shards(cat, shards, short_side=256)

    rows = []
    for size in args.sizes:
        config = PipelineConfig(img_size=size)
        loader = DataLoader(
            RawJpegBatches(cat, size),
            sampler=BatchSampler(SequentialSampler(range(len(cat))), args.batch_size, False),
            batch_size=None,
            num_workers=args.workers,
            persistent_workers=False,
        )
        # Each source is built once per size and iterated once per pass, as training builds
        # its pipeline once and streams it every epoch (the DataLoader too is built once).
        raw = build_pipeline(read_catalogue_files(cat), "train", config)
        sources = {
            ("loader", f"DataLoader raw JPEG ({args.workers} workers)"): (
                lambda loader=loader: loader
            ),
            ("raw", "Ray Data raw files"): lambda raw=raw: raw.iter_torch_batches(
                batch_size=args.batch_size
            ),
        }
        for block in args.rows_per_block:
            sharded = build_pipeline(
                read_shards(shards, "train", rows_per_block=block),
                "train",
                replace(config, rows_per_block=block),
            )
            name = "Ray Data Parquet shards"
            if len(args.rows_per_block) > 1:
                name += f" ({block}-row blocks)"
            sources["shards", name] = lambda sharded=sharded: sharded.iter_torch_batches(
                batch_size=args.batch_size
            )
        chosen = {key: item for key, item in sources.items() if key[0] in args.sources}
        # Round-robin, not source after source: this VM drifts by ±15 % over minutes, and a
        # drift must hit every source alike, not only the one that happened to run during it.
        runs: dict[tuple[str, str], list[Pass]] = {key: [] for key in chosen}
        for _ in range(args.repeats):
            for key, make_batches in chosen.items():
                runs[key].append(timed(make_batches))
        baseline: Pass | None = None
        for (_, name), passes in runs.items():
            median = Pass(
                statistics.median(p.rate for p in passes),
                statistics.median(p.first_batch_s for p in passes),
                statistics.median(p.steady_rate for p in passes),
            )
            baseline = baseline or median
            rates = [p.rate for p in passes]
            rows.append((size, name, median, min(rates), max(rates), baseline))
            print(f"{size}px {name}: {median.rate:.0f} img/s (runs: {[round(r) for r in rates]})")

    print(
        f"\n{len(cat)} derm-sample training images, batch {args.batch_size}, "
        f"median of {args.repeats} runs; 'after 1st batch' leaves out the start-up\n"
    )
    print(
        "| size | source | images/s (median) | min | max | vs baseline "
        "| first batch (s) | after 1st batch, images/s | vs baseline |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, name, median, lo, hi, base in rows:
        print(
            f"| {size} | {name} | {median.rate:.0f} | {lo:.0f} | {hi:.0f} "
            f"| {median.rate / base.rate:.2f}x | {median.first_batch_s:.2f} "
            f"| {median.steady_rate:.0f} | {median.steady_rate / base.steady_rate:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
