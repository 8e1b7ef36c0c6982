"""Fine-tune DermResNetSE on Ray Train (CPU or GPU workers), fed by Ray Data.

    python jobs/train.py --shards /data/shards --epochs 10 --img-size 128 --num-workers 2
    python jobs/train.py --csv metadata.csv --images images/ --epochs 3      # no prepare step
    ray job submit --working-dir . -- python jobs/train.py --shards s3://bucket/shards \\
        --storage-path s3://bucket/runs --use-gpu --num-workers 8

Re-running with the same --name and --storage-path resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dermanet.cli import add_run_arguments
from dermanet.data.catalogue import CatalogueError
from dermanet.models import DEFAULT_CONFIG_PATH
from dermanet.runtime import check_storage_location, init_ray
from dermanet.train.supervised import (
    PRECISIONS,
    TrainSettings,
    load_settings_yaml,
    run_training,
)

DEFAULTS = TrainSettings()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        help="YAML of training settings (e.g. jobs/tune.py's best_config.yaml); flags override it",
    )
    data = p.add_argument_group("data")
    data.add_argument("--shards", help="prepared shards (jobs/prepare_data.py output; path or URI)")
    data.add_argument("--csv", help="catalogue CSV instead of shards (any supported format)")
    data.add_argument("--images", help="image folder for --csv")
    data.add_argument("--drop-missing", action="store_true", help="drop rows without image file")
    data.add_argument("--split-seed", type=int, default=0, help="seed of the split for --csv")
    data.add_argument("--img-size", type=int, default=DEFAULTS.img_size, help="input side (px)")
    model = p.add_argument_group("model")
    model.add_argument("--model-config", default=str(DEFAULT_CONFIG_PATH), help="model YAML")
    model.add_argument(
        "--pretrain-ckpt", help="BYOL backbone.pt to start from (reports matched/missing keys)"
    )
    model.add_argument("--dropout", type=float, help="override the config's head dropout")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="training epochs")
    opt.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="per worker")
    opt.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    opt.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="AdamW wd")
    opt.add_argument("--optimizer", choices=("adamw", "lars"), default="adamw", help="optimizer")
    opt.add_argument(
        "--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs, help="linear LR warm-up"
    )
    opt.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy smoothing")
    opt.add_argument(
        "--aux-loss-weight", type=float, default=0.0, help="benign-vs-malignant loss weight (0 off)"
    )
    opt.add_argument("--precision", choices=PRECISIONS, default="32-true", help="numeric precision")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip (0 disables)")
    opt.add_argument(
        "--early-stopping-patience", type=int, default=0, help="epochs without gain (0 off)"
    )
    opt.add_argument("--monitor", default=DEFAULTS.monitor, help="metric that picks best.pt")
    opt.add_argument("--seed", type=int, default=0, help="random seed")
    opt.add_argument(
        "--on-nan", choices=("stop", "skip"), default="stop", help="on a non-finite step"
    )
    add_run_arguments(p, DEFAULTS, "folder or URI for checkpoints and logs")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        parser.set_defaults(**load_settings_yaml(args.config))
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fields = set(TrainSettings.__dataclass_fields__)
    settings = TrainSettings(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        settings.validate()
        check_storage_location(settings.storage_path)
        init_ray(address=args.address)
        outcome = run_training(settings)
    except (CatalogueError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"best checkpoint: {outcome.best_checkpoint}\nlast checkpoint: {outcome.last_checkpoint}")
    print(json.dumps(outcome.best_metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
