"""Search training hyperparameters with Ray Tune (ASHA early stopping, Optuna search).

    python jobs/tune.py --shards /data/shards --epochs 6 --num-samples 8 --registry weights/
    ray job submit --working-dir . -- python jobs/tune.py --shards s3://bucket/shards \\
        --storage-path s3://bucket/tune --use-gpu --max-concurrent 4

Writes trials.csv / trials.md (every trial: config, best metric, epochs run, status),
trial_curves.png and best_config.yaml (usable as `jobs/train.py --config best_config.yaml`)
under <storage-path>/<name>; copies the best checkpoint into --registry. Re-running the same
--name resumes the search without rerunning finished trials.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dermanet.cli import add_address_argument
from dermanet.data.catalogue import CatalogueError
from dermanet.models import DEFAULT_CONFIG_PATH
from dermanet.runtime import check_storage_location, init_ray
from dermanet.train.supervised import TrainSettings
from dermanet.train.tune import DEFAULT_SPACE, TuneSettings, run_tune


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--shards", help="prepared shards (path or URI)")
    p.add_argument("--csv", help="catalogue CSV instead of shards")
    p.add_argument("--images", help="image folder for --csv")
    p.add_argument("--space", default=str(DEFAULT_SPACE), help="search space YAML")
    p.add_argument("--epochs", type=int, default=6, help="max epochs per trial (ASHA max_t)")
    p.add_argument("--num-samples", type=int, default=8, help="number of trials")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials running at once")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before stopping")
    p.add_argument("--reduction-factor", type=int, default=2, help="ASHA: keep 1/rf per rung")
    p.add_argument(
        "--search-alg", choices=("optuna", "random"), default="optuna", help="search algorithm"
    )
    p.add_argument("--model-config", default=str(DEFAULT_CONFIG_PATH), help="model YAML")
    p.add_argument("--monitor", default="val/balanced_accuracy", help="metric to maximise")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers per trial")
    p.add_argument("--cpus-per-worker", type=float, default=0.5, help="CPUs per training worker")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per training worker")
    p.add_argument("--trial-cpus", type=float, default=0.1, help="CPUs of each trial's driver")
    p.add_argument("--storage-path", default="outputs", help="folder or URI for results")
    p.add_argument("--name", default="dermanet-tune", help="experiment name (resume key)")
    p.add_argument("--registry", help="model registry folder to copy the best checkpoint into")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    add_address_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    base = TrainSettings(
        shards=args.shards,
        csv=args.csv,
        images=args.images,
        epochs=args.epochs,
        model_config=args.model_config,
        monitor=args.monitor,
        num_workers=args.num_workers,
        cpus_per_worker=args.cpus_per_worker,
        use_gpu=args.use_gpu,
        seed=args.seed,
    )
    settings = TuneSettings(
        base=base,
        space=args.space,
        name=args.name,
        storage_path=args.storage_path,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        search_alg=args.search_alg,
        trial_cpus=args.trial_cpus,
        registry=args.registry,
        seed=args.seed,
    )
    try:
        base.validate()
        check_storage_location(settings.storage_path)
        init_ray(address=args.address)
        table = run_tune(settings)
    except (CatalogueError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
