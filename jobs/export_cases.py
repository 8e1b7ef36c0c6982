"""Export the confirmed cases (latest diagnosis per case, its images) as a plain catalogue.

examples:
  python jobs/export_cases.py --output confirmed.csv --images confirmed/
  python jobs/evaluate.py --checkpoint weights/default.pt --csv confirmed.csv \\
      --images confirmed/ --split all --output eval-clinic/

Reads the configured database ($DERMANET_DATABASE_URL, else the SQLite file in
$DERMANET_DATA_DIR or data/). The CSV (`image,label,lesion_id,anatom_site,method,...`) is what
jobs/evaluate.py, jobs/compare.py (--groups, e.g. --group-by method) and jobs/train.py read.
"""

from __future__ import annotations

import argparse
import sys

from dermanet.cli import HelpFormatter, run_job


def build_parser() -> argparse.ArgumentParser:
    lines = __doc__.strip().splitlines()
    p = argparse.ArgumentParser(
        description=lines[0], epilog="\n".join(lines[1:]), formatter_class=HelpFormatter
    )
    p.add_argument("--output", required=True, help="catalogue CSV to write")
    p.add_argument("--images", required=True, help="folder for the images (created)")
    p.add_argument("--database-url", help="SQLAlchemy URL; unset: $DERMANET_DATABASE_URL")
    p.add_argument("--data-dir", help="data folder; unset: $DERMANET_DATA_DIR, else data/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dermanet.cases.export import run_export

    code, summary = run_job(
        lambda: run_export(args.output, args.images, args.database_url, args.data_dir)
    )
    if summary is not None:
        labels = ", ".join(f"{label} {n}" for label, n in sorted(summary.labels.items()))
        print(
            f"{summary.images} images of {summary.cases} confirmed cases ({labels}) -> "
            f"{args.output}, images in {args.images}"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
