"""Evaluate a checkpoint on a split with the official ISIC scorer; write a report.

    python jobs/evaluate.py --checkpoint outputs/run/best.pt --shards /data/shards --output eval/
    python jobs/evaluate.py --checkpoint weights/default.pt --csv metadata.csv --images images/ \\
        --split test --tta --output eval/

Outputs: predictions.csv (ISIC submission format), truth.csv, report.md, report.json,
roc_curves.png, confusion_matrix.png.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dermanet.cli import add_address_argument
from dermanet.data.catalogue import SPLITS, CatalogueError
from dermanet.eval.evaluate import EvaluateSettings, run_evaluation
from dermanet.inference.checkpoint import CheckpointError
from dermanet.runtime import init_ray


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="DermaNet checkpoint (.pt) to evaluate")
    p.add_argument("--output", required=True, help="folder for the report and predictions")
    p.add_argument("--shards", help="prepared shards (jobs/prepare_data.py output)")
    p.add_argument("--csv", help="catalogue CSV instead of shards")
    p.add_argument("--images", help="image folder for --csv")
    p.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate")
    p.add_argument("--split-seed", type=int, default=0, help="split seed when --csv has none")
    p.add_argument("--tta", action="store_true", help="average logits over the four flips")
    p.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="skip temperature scaling on the val split",
    )
    p.add_argument("--batch-size", type=int, default=64, help="inference batch size")
    p.add_argument(
        "--export",
        help="also write the model with its fitted temperature and these scores to this .pt "
        "(e.g. weights/default.pt: Serve then serves calibrated probabilities)",
    )
    p.add_argument("--half", action="store_true", help="--export in float16 (half the size)")
    add_address_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if (args.shards is None) == (args.csv is None) or (args.csv and not args.images):
        print("error: give --shards, or --csv with --images", file=sys.stderr)
        return 2
    if args.export and not args.export.endswith(".pt"):
        print(
            "error: --export needs a .pt file name (the model registry lists *.pt)", file=sys.stderr
        )
        return 2
    if args.half and not args.export:
        print("error: --half applies to --export; give --export PATH.pt", file=sys.stderr)
        return 2
    settings = EvaluateSettings(
        checkpoint=args.checkpoint,
        output=args.output,
        shards=args.shards,
        csv=args.csv,
        images=args.images,
        split=args.split,
        split_seed=args.split_seed,
        tta=args.tta,
        calibrate=args.calibrate,
        batch_size=args.batch_size,
        export=args.export,
        half=args.half,
    )
    try:
        init_ray(address=args.address)
        report = run_evaluation(settings)
    except (CatalogueError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"balanced accuracy {report['official']['balanced_accuracy']:.4f}, macro AUROC "
          f"{report['metrics']['macro_auroc']:.4f}; report in {args.output}/report.md")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
