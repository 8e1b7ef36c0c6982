"""Prepare a dermoscopy data set as Parquet shards with Ray Data.

examples:
  python jobs/prepare_data.py --csv metadata.csv --images images/ --output /data/shards
  ray job submit --working-dir . -- python jobs/prepare_data.py ... --output s3://bucket/shards
"""

from __future__ import annotations

import sys

from dermanet.cli import parse_settings, run_job, settings_parser, setup_logging
from dermanet.data.prepare import PrepareSettings, run_prepare
from dermanet.runtime import init_ray


def build_parser():
    parser = settings_parser(__doc__, PrepareSettings)
    parser.add_argument("--num-cpus", type=int, help="CPUs for a local Ray; unset: all")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    settings, args = parse_settings(build_parser(), argv, PrepareSettings)

    def work():
        settings.validate()  # before a Ray starts
        init_ray(address=args.address, num_cpus=args.num_cpus)
        return run_prepare(settings)

    code, report = run_job(work)
    if report is not None:
        print(report.summary())
    return code


if __name__ == "__main__":
    sys.exit(main())
