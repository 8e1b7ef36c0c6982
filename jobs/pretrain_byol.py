"""BYOL self-supervised pretraining of the DermResNetSE backbone on Ray Train.

    python jobs/pretrain_byol.py --data-dirs images/ more_images/ --img-size 128 --max-epochs 100
    python jobs/pretrain_byol.py --shards /data/shards --img-size 64 --max-epochs 5  # no labels
    ray job submit --working-dir . -- python jobs/pretrain_byol.py --shards s3://bucket/shards \\
        --storage-path s3://bucket/runs --use-gpu --num-workers 8 --sync-batchnorm

Writes <storage-path>/<name>/backbone.pt (fine-tune with jobs/train.py --pretrain-ckpt), and
logs/metrics.csv + logs/byol_curves.png. Re-running with the same --name and --storage-path
resumes from the last checkpoint (raise --max-epochs to train on).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ray.train import TrainingFailedError

from dermanet.cli import add_run_arguments
from dermanet.data.catalogue import SPLITS, CatalogueError
from dermanet.runtime import check_storage_location, init_ray
from dermanet.train.pretrain import OPTIMIZERS, PretrainSettings, run_pretraining
from dermanet.train.ray_common import PRECISIONS

DEFAULTS = PretrainSettings()


def build_parser() -> argparse.ArgumentParser:
    """Flags of the original scripts/pretrain_byol.py (old spellings kept as aliases) + Ray's."""
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data (give --data-dirs or --shards)")
    data.add_argument(
        "--data-dirs", nargs="+", default=[], metavar="DIR",
        help="one or more image folders (searched recursively for .jpg/.jpeg/.png)",
    )  # fmt: skip
    data.add_argument(
        "--shards", help="prepared shards (jobs/prepare_data.py output; labels are ignored)"
    )
    data.add_argument(
        "--shard-splits", nargs="+", choices=SPLITS, default=list(SPLITS),
        help="which shard splits to pretrain on (no labels are used, so val/test are fair game "
        "for self-supervision; pass 'train' to keep them unseen)",
    )  # fmt: skip
    data.add_argument("--img-size", type=int, default=DEFAULTS.img_size, help="view side (px)")
    model = p.add_argument_group("model")
    model.add_argument(
        "--model-config", "--model-cfg", dest="model_config", default=DEFAULTS.model_config,
        help="DermResNetSE YAML (the fine-tune must use the same one)",
    )  # fmt: skip
    model.add_argument("--proj-hidden-dim", type=int, default=4096, help="projector hidden size")
    model.add_argument("--proj-out-dim", type=int, default=256, help="projection (embedding) size")
    model.add_argument("--pred-hidden-dim", type=int, default=4096, help="predictor hidden size")
    model.add_argument(
        "--sync-batchnorm", action="store_true", help="BatchNorm statistics over all workers"
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--max-epochs", type=int, default=DEFAULTS.max_epochs, help="epochs in all")
    opt.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size, help="images per worker per step"
    )
    opt.add_argument(
        "--accumulate-grad-batches", type=int, default=1,
        help="batches per optimiser step (the EMA target moves once per step)",
    )  # fmt: skip
    opt.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak learning rate")
    opt.add_argument(
        "--weight-decay", type=float, default=DEFAULTS.weight_decay,
        help="weight decay (not on norms, biases, GeM p)",
    )  # fmt: skip
    opt.add_argument(
        "--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer, help="AdamW or LARS"
    )
    opt.add_argument(
        "--warmup-epochs", type=float, default=DEFAULTS.warmup_epochs,
        help="linear LR warm-up, then cosine decay",
    )  # fmt: skip
    opt.add_argument(
        "--base-momentum", type=float, default=DEFAULTS.base_momentum,
        help="target EMA momentum at step 0 (cosine to 1 at the end)",
    )  # fmt: skip
    opt.add_argument(
        "--grad-clip", "--gradient-clip-val", dest="grad_clip", type=float,
        default=DEFAULTS.grad_clip, help="gradient norm clip (0 disables)",
    )  # fmt: skip
    opt.add_argument(
        "--precision", choices=PRECISIONS, default=DEFAULTS.precision,
        help="numeric precision (16-mixed becomes bf16-mixed on CPU)",
    )  # fmt: skip
    opt.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed")
    opt.add_argument(
        "--on-nan", choices=("stop", "skip"), default=DEFAULTS.on_nan,
        help="on a non-finite step: stop the run, or skip the step (a JSON dump either way)",
    )  # fmt: skip
    opt.add_argument(
        "--histogram-every-n-steps", type=int, default=0,
        help="TensorBoard weight/gradient histograms every N steps (0 off)",
    )  # fmt: skip
    run = add_run_arguments(p, DEFAULTS, "folder or URI for checkpoints, backbone.pt and logs")
    run.add_argument(
        "--log-dir", help="folder for metrics.csv, byol_curves.png, TensorBoard, NaN dumps "
        "(None: <storage-path>/<name>/logs)",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fields = set(PretrainSettings.__dataclass_fields__)
    settings = PretrainSettings(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        settings.validate()
        check_storage_location(settings.storage_path)
        init_ray(address=args.address)
        outcome = run_pretraining(settings)
    except (CatalogueError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingFailedError as exc:
        summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(
            f"error: training failed after {settings.max_failures} worker-group retries "
            f"({summary}). Finished epochs are checkpointed under {settings.storage_path}/"
            f"{settings.name}: rerun the same command to resume (raise --max-failures if "
            "workers were killed, e.g. for memory).",
            file=sys.stderr,
        )
        return 1
    print(f"backbone: {outcome.backbone}")
    print(f"fine-tune with: python jobs/train.py --pretrain-ckpt {outcome.backbone} ...")
    if outcome.metrics_csv is not None:
        print(f"metrics: {outcome.metrics_csv}\ncurves: {outcome.curves_png}")
    epoch_metrics = {k: v for k, v in outcome.final_metrics.items() if k.endswith("_epoch")}
    print(json.dumps({"epochs": outcome.epochs_completed, **epoch_metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
