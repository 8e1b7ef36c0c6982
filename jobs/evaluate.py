"""Evaluate a checkpoint on a split with the official ISIC scorer; write a report.

examples:
  python jobs/evaluate.py --checkpoint outputs/run/best.pt --shards /data/shards --output eval/
  python jobs/evaluate.py --checkpoint weights/default.pt --csv metadata.csv --images images/ \\
      --split test --tta --output eval/
  python jobs/evaluate.py --checkpoint weights/default.pt --csv external.csv --images ext/ \\
      --split all --output eval-external/          # an external set: every row, no split

Outputs: predictions.csv (ISIC submission format), truth.csv, report.md, report.json,
roc_curves.png, confusion_matrix.png, reliability.png. Classes absent from the truth are left
out of per-class and averaged metrics (and named); a catalogue with an `origin` column gets a
per-source table.
"""

from __future__ import annotations

import sys

from dermanet.cli import parse_settings, run_job, settings_parser, setup_logging
from dermanet.eval.evaluate import EvaluateSettings, run_evaluation
from dermanet.runtime import init_ray


def build_parser():
    return settings_parser(__doc__, EvaluateSettings)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    settings, args = parse_settings(build_parser(), argv, EvaluateSettings)

    def work():
        settings.validate()
        init_ray(address=args.address)
        return run_evaluation(settings)

    code, report = run_job(work)
    if report is not None:
        print(
            f"balanced accuracy {report['official']['balanced_accuracy']:.4f}, macro AUROC "
            f"{report['metrics']['macro_auroc']:.4f}; report in {settings.output}/report.md"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
