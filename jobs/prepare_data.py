"""Prepare a dermoscopy data set as Parquet shards with Ray Data.

python jobs/prepare_data.py --csv metadata.csv --images images/ --output /data/shards
ray job submit --working-dir . -- python jobs/prepare_data.py ... --output s3://bucket/shards
"""

from __future__ import annotations

import argparse
import logging
import sys

from dermanet.cli import add_address_argument
from dermanet.data.catalogue import CatalogueError
from dermanet.data.prepare import PrepareSettings, run_prepare
from dermanet.data.shards import ShardsExistError
from dermanet.runtime import init_ray


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--csv",
        required=True,
        help="catalogue CSV: plain 'image,label[,lesion_id,...]', ISIC 2019 ground truth or "
        "HAM10000 metadata (detected from the header)",
    )
    p.add_argument("--images", required=True, help="folder with the images (searched recursively)")
    p.add_argument(
        "--output", required=True, help="output folder or URI (s3://, gs://, file://) for shards"
    )
    p.add_argument("--metadata-csv", help="ISIC_2019_Training_Metadata.csv (ISIC 2019 format only)")
    p.add_argument(
        "--drop-missing",
        action="store_true",
        help="drop catalogue rows whose image file is missing (reported) instead of failing",
    )
    p.add_argument("--val-fraction", type=float, default=0.15, help="share of images for val")
    p.add_argument("--test-fraction", type=float, default=0.15, help="share of images for test")
    p.add_argument("--seed", type=int, default=0, help="seed of the lesion-grouped split")
    p.add_argument(
        "--short-side", type=int, default=256, help="shrink images so the short side is this"
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of stored images")
    p.add_argument("--rows-per-file", type=int, default=2048, help="minimum rows per Parquet file")
    p.add_argument("--limit", type=int, help="keep only a random N images (quick experiments)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already at --output")
    add_address_argument(p)
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = PrepareSettings(
        csv=args.csv,
        images=args.images,
        output=args.output,
        metadata_csv=args.metadata_csv,
        drop_missing=args.drop_missing,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.seed,
        short_side=args.short_side,
        jpeg_quality=args.jpeg_quality,
        rows_per_file=args.rows_per_file,
        limit=args.limit,
        overwrite=args.overwrite,
    )
    try:
        init_ray(address=args.address, num_cpus=args.num_cpus)
        report = run_prepare(settings)
    except (CatalogueError, ShardsExistError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
