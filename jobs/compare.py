"""Compare two models' evaluate reports on the same images: paired bootstrap, per group.

    .venv/bin/python jobs/evaluate.py --checkpoint weights/default.pt --shards SHARDS \\
        --split val --tta flips --output /tmp/eval-shipped
    .venv/bin/python jobs/evaluate.py --checkpoint RUN/last.pt --shards SHARDS \\
        --split val --tta flips --output /tmp/eval-candidate
    .venv/bin/python jobs/compare.py /tmp/eval-shipped /tmp/eval-candidate \\
        --groups ../shared/data/derm-sample/metadata.csv --group-by origin --plot diff.png

Prints, for all images and for each group, both models' balanced accuracy, macro AUROC,
melanoma AUROC and melanoma recall (--metrics picks), the difference (candidate - baseline)
and its bootstrap interval (whole lesions drawn when the CSV has `lesion_id`); "within noise"
means the interval holds 0. Each row is its own 95 % interval: among many rows, one may exclude
0 by chance. Choose on validation, never on test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dermanet.cli import HelpFormatter, run_job, setup_logging
from dermanet.eval.compare import (
    METRICS,
    markdown_table,
    paired_bootstrap,
    read_grouping,
    read_report,
)
from dermanet.eval.plots import differences_figure, save_figure


def build_parser() -> argparse.ArgumentParser:
    lines = __doc__.strip().splitlines()
    p = argparse.ArgumentParser(
        description=lines[0],
        epilog="\n".join(lines[1:]),
        formatter_class=HelpFormatter,
    )
    p.add_argument("baseline", help="jobs/evaluate.py --output folder of the reference model")
    p.add_argument("candidate", help="jobs/evaluate.py --output folder of the model to judge")
    p.add_argument(
        "--groups", help="CSV with an `image` column and --group-by, to compare inside groups too"
    )
    p.add_argument("--group-by", default="origin", help="the --groups column to group by")
    p.add_argument(
        "--cluster-by",
        help="a --groups column whose units are drawn whole (images of one lesion are not "
        "independent; drawing them one by one narrows the interval). Default: lesion_id when "
        "the CSV has it; 'none' draws single images",
    )
    p.add_argument("--resamples", type=int, default=1000, help="paired bootstrap draws")
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument(
        "--metrics", nargs="+", default=list(METRICS), choices=list(METRICS), help="what to compare"
    )
    p.add_argument("--output", help="also write the differences to this JSON file")
    p.add_argument("--plot", help="also draw them (a forest plot per metric) to this PNG file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def work() -> str:
        groups = clusters = None
        if args.groups:
            grouping = read_grouping(args.groups, args.group_by, args.cluster_by)
            groups, clusters, cluster_by = grouping
            if cluster_by:
                print(f"drawing whole {cluster_by} units", file=sys.stderr)
        elif args.cluster_by not in (None, "none"):
            raise ValueError("--cluster-by needs --groups (the CSV that has the column)")
        differences = paired_bootstrap(
            read_report(args.baseline), read_report(args.candidate), groups, clusters,
            resamples=args.resamples, confidence=args.confidence, seed=args.seed,
            metrics=args.metrics,
        )  # fmt: skip
        if args.plot:
            title = f"{Path(args.candidate).name} vs {Path(args.baseline).name}"
            save_figure(differences_figure(differences, title), args.plot)
        if args.output:
            with open(args.output, "w") as f:
                json.dump([d.to_dict() for d in differences], f, indent=2)
        return markdown_table(differences, args.confidence)

    code, table = run_job(work)
    if code == 0:
        print(f"baseline {args.baseline}, candidate {args.candidate}\n\n{table}")
    return code


if __name__ == "__main__":
    sys.exit(main())
