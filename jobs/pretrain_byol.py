"""BYOL self-supervised pretraining of the DermResNetSE backbone on Ray Train.

examples:
  python jobs/pretrain_byol.py --data-dirs images/ more_images/ --img-size 128 --max-epochs 100
  python jobs/pretrain_byol.py --shards /data/shards --img-size 64 --max-epochs 5  # no labels
  ray job submit --working-dir . -- python jobs/pretrain_byol.py --shards s3://bucket/shards \\
      --storage-path s3://bucket/runs --use-gpu --num-workers 8 --sync-batchnorm

Writes <storage-path>/<name>/backbone.pt (fine-tune with jobs/train.py --pretrain-ckpt), and
logs/metrics.csv + logs/byol_curves.png. Re-running with the same --name and --storage-path
resumes from the last checkpoint (raise --max-epochs to train on). With --shards, the test
split stays unseen unless --shard-splits names it.
"""

from __future__ import annotations

import json
import sys

from dermanet.cli import parse_settings, run_job, settings_parser, setup_logging
from dermanet.runtime import check_storage_location, init_ray, quiet_ray_data_logs
from dermanet.storage import join
from dermanet.train.pretrain import run_pretraining
from dermanet.train.settings import PretrainSettings


def build_parser():
    return settings_parser(__doc__, PretrainSettings)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    settings, args = parse_settings(build_parser(), argv, PretrainSettings)

    def work():
        settings.validate()
        check_storage_location(settings.storage_path)
        quiet_ray_data_logs()
        init_ray(address=args.address)
        return run_pretraining(settings)

    code, outcome = run_job(work, resume_hint=join(settings.storage_path, settings.name))
    if outcome is not None:
        print(f"backbone: {outcome.backbone}")
        print(f"fine-tune with: python jobs/train.py --pretrain-ckpt {outcome.backbone} ...")
        if outcome.metrics_csv is not None:
            print(f"metrics: {outcome.metrics_csv}\ncurves: {outcome.curves_png}")
        epoch_metrics = {k: v for k, v in outcome.final_metrics.items() if k.endswith("_epoch")}
        print(json.dumps({"epochs": outcome.epochs_completed, **epoch_metrics}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
