"""Score images with a DermaNet model on Ray Data: one row per image (batch inference).

examples:
  python jobs/predict.py --input /data/clinic-2025/ --output scores.parquet
  python jobs/predict.py --input metadata.csv --images images/ --output scores.csv --embeddings
  python jobs/predict.py --input s3://bucket/archive/ --output s3://bucket/scores.parquet \\
      --model s3://bucket/registry/default.pt --use-gpu --num-workers 4

Each row: image, path (label for a catalogue), model_id, prob_<class> for every class, top
class, risk, traffic light, the gate and prediction-set fields of /v1/classify, an `embedding`
with --embeddings, and `error` (null, or why the file could not be read: such rows are logged,
never fatal). The numbers are the server's: same decoder, same Predictor.
"""

from __future__ import annotations

import sys

from dermanet.cli import parse_settings, run_job, settings_parser, setup_logging
from dermanet.inference.batch import PredictSettings, run_prediction
from dermanet.runtime import init_ray


def build_parser():
    return settings_parser(__doc__, PredictSettings)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    settings, args = parse_settings(build_parser(), argv, PredictSettings)

    def work():
        settings.validate()
        joined = init_ray(address=args.address)
        return run_prediction(settings, fixed_cluster=joined is None)

    code, outcome = run_job(work)
    if outcome is not None:
        print(
            f"{outcome.images} images scored with {outcome.model_id!r} ({outcome.failed} "
            f"unreadable) in {outcome.seconds:.1f} s -> {outcome.output}"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
