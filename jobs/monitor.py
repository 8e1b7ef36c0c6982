"""Drift report of the answers DermaNet gave: refusals by reason over time, OOD scores against
validation's, predicted class mix against the training prior, per model version.

    .venv/bin/python jobs/predict.py --input val.csv --images IMAGES --output val-scores.parquet
    .venv/bin/python jobs/monitor.py --answers clinic-scores.parquet \\
        --reference val-scores.parquet --since 7d --output /tmp/drift

--answers: a jobs/predict.py output table (Parquet or CSV; a `time` column, when present,
places each answer in time and --since filters on it); or --database: the case database's
stored answers (each with its time and model file). --reference: the same job's output on
the validation images of the served model (with their `label` column: the class prior).
Writes report.md and PNGs to --output; with too few answers it says so in the report.
"""

from __future__ import annotations

import argparse
import sys

from dermanet.cli import HelpFormatter, run_job, setup_logging
from dermanet.monitoring.drift import (
    MIN_ANSWERS,
    drift_report,
    parse_since,
    read_answers,
    read_case_answers,
)
from dermanet.monitoring.report import write_report


def build_parser() -> argparse.ArgumentParser:
    lines = __doc__.strip().splitlines()
    p = argparse.ArgumentParser(
        description=lines[0], epilog="\n".join(lines[1:]), formatter_class=HelpFormatter
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--answers", help="the answers: a jobs/predict.py table")
    source.add_argument(
        "--database", help="the answers stored with cases: the case database's SQLAlchemy URL"
    )
    p.add_argument("--reference", help="jobs/predict.py's table of the validation images")
    p.add_argument("--since", default="7d", help="window: e.g. 30m, 12h, 7d, 2w")
    p.add_argument("--output", required=True, help="folder for report.md and its PNGs")
    p.add_argument(
        "--min-answers", type=int, default=MIN_ANSWERS, help="fewest answers a test runs on"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def work():
        since = parse_since(args.since)
        reference = read_answers(args.reference) if args.reference else None
        answers = read_answers(args.answers) if args.answers else read_case_answers(args.database)
        report = drift_report(answers, reference, since, None, args.min_answers)
        return report, write_report(report, args.output, args.answers or "the case database")

    code, outcome = run_job(work)
    if outcome is not None:
        report, path = outcome
        for note in report.notes + [n for m in report.models for n in m.notes]:
            print(f"note: {note}")
        total = sum(m.answers for m in report.models)
        print(f"{total} answers, {len(report.models)} model version(s) -> {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
