"""Where does a Ray Data training pass spend its time? One long pass over prepared shards.

    .venv/bin/python -m benchmarks.data_profile --shards /tmp/dn/derm-shards --img-size 128

Streams the whole train split through the training pipeline (`read_shards` -> `build_pipeline`
-> `iter_torch_batches`, exactly what jobs/train.py feeds its workers) and prints:
  - the pass's images/s, next to the same decode + augment run in this process alone
    (`decode_transform_batch` over the same rows: the work, without any data movement);
  - Ray Data's own per-operator statistics (`Dataset.stats()`): wall and CPU time per operator,
    time in our UDF, and the iterator's time blocked waiting, formatting and collating batches.
For a stack profile of the map tasks, attach py-spy to the Ray workers while it runs (see
docs/benchmarks.md for the command).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow.parquet as pq

from dermanet.data.pipelines import (
    PipelineConfig,
    build_pipeline,
    decode_transform_batch,
    read_shards,
)
from dermanet.data.shards import shard_dir
from dermanet.runtime import init_ray


def in_process_rate(shards: str, split: str, img_size: int, limit: int) -> float:
    """Images/s of decode + train augmentation alone, one process, no Ray."""
    table = pq.read_table(shard_dir(shards, split), columns=["jpeg", "label_index", "index"])
    table = table.slice(0, limit)
    start = time.perf_counter()
    for offset in range(0, table.num_rows, 32):
        decode_transform_batch(table.slice(offset, 32).to_pydict(), "train", img_size)
    return table.num_rows / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="prepared shards (jobs/prepare_data.py)")
    p.add_argument("--split", default="train", help="split to stream")
    p.add_argument("--img-size", type=int, default=128, help="training image side")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs given to the local Ray")
    p.add_argument(
        "--rows-per-block",
        type=int,
        default=PipelineConfig.rows_per_block,
        help="PipelineConfig knob",
    )
    p.add_argument("--map-batch-size", type=int, default=32, help="rows per map_batches call")
    p.add_argument("--in-process-images", type=int, default=1000, help="images for the solo run")
    args = p.parse_args(argv)

    solo = in_process_rate(args.shards, args.split, args.img_size, args.in_process_images)
    init_ray(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    config = PipelineConfig(
        img_size=args.img_size, rows_per_block=args.rows_per_block, batch_size=args.map_batch_size
    )
    source = read_shards(args.shards, args.split, rows_per_block=args.rows_per_block)
    ds = build_pipeline(source, "train", config)
    start = time.perf_counter()
    images = sum(len(b["label"]) for b in ds.iter_torch_batches(batch_size=args.batch_size))
    seconds = time.perf_counter() - start
    rate = images / seconds
    print(ds.stats())
    print(f"\n{images} images, {args.img_size} px, {args.num_cpus} CPUs for Ray")
    print("| measurement | images/s | vs one process, no Ray |")
    print("|---|---:|---:|")
    print(f"| decode + augment, one process, no Ray | {solo:.0f} | 1.00x |")
    print(f"| Ray Data pass over shards ({seconds:.1f} s) | {rate:.0f} | {rate / solo:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
