"""Fine-tune DermResNetSE on Ray Train (CPU or GPU workers), fed by Ray Data.

examples:
  python jobs/train.py --shards /data/shards --epochs 10 --img-size 128 --num-workers 2
  python jobs/train.py --csv metadata.csv --images images/ --epochs 3      # no prepare step
  ray job submit --working-dir . -- python jobs/train.py --shards s3://bucket/shards \\
      --storage-path s3://bucket/runs --use-gpu --num-workers 8

Re-running with the same --name and --storage-path resumes from the last checkpoint.
Writes <storage-path>/<name>/best.pt and last.pt, logs/metrics.csv, training curves,
confusion matrices and TensorBoard logs; the console shows one line per epoch.
"""

from __future__ import annotations

import sys

from dermanet.cli import parse_settings, run_job, settings_parser, setup_logging
from dermanet.runtime import check_storage_location, init_ray, quiet_ray_data_logs
from dermanet.storage import join
from dermanet.train.settings import TrainSettings
from dermanet.train.supervised import run_training


def build_parser():
    return settings_parser(__doc__, TrainSettings, config_file=True)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    settings, args = parse_settings(build_parser(), argv, TrainSettings)

    def work():
        settings.validate()
        check_storage_location(settings.storage_path)
        quiet_ray_data_logs()
        init_ray(address=args.address)
        return run_training(settings)

    code, outcome = run_job(work, resume_hint=join(settings.storage_path, settings.name))
    if outcome is not None:
        best = outcome.best_metrics
        print(
            f"best checkpoint: {outcome.best_checkpoint}\nlast checkpoint: "
            f"{outcome.last_checkpoint}\nbest epoch {int(best.get('epoch', -1)) + 1}: "
            f"val balanced accuracy {best.get('val/balanced_accuracy', float('nan')):.4f}, "
            f"macro AUROC {best.get('val/macro_auroc', float('nan')):.4f} "
            f"(all metrics: {outcome.output}/logs/metrics.csv)"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
