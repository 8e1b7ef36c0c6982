"""Average the weights of classifier checkpoints of one lineage into a new checkpoint.

    python jobs/average_weights.py RUN/last.pt weights/default.pt --output /tmp/avg.pt

Score the result on validation (`jobs/evaluate.py --split val --tta flips`) before shipping
it, and export it with `jobs/evaluate.py --export`, which fits its temperature, trust gate and
served views.
"""

from __future__ import annotations

import argparse
import sys

from dermanet.cli import run_job, setup_logging
from dermanet.inference.averaging import average_checkpoints


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "checkpoints", nargs="+", help="two or more classifier checkpoints of one architecture"
    )
    p.add_argument("--output", required=True, help="checkpoint file to write")
    p.add_argument(
        "--img-size", type=int, help="input size the average serves at (default: the first's)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    code, path = run_job(lambda: average_checkpoints(args.checkpoints, args.output, args.img_size))
    if code == 0:
        print(f"wrote the average of {len(args.checkpoints)} checkpoints to {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
