"""Search training hyperparameters with Ray Tune (ASHA early stopping, Optuna search).

examples:
  python jobs/tune.py --shards /data/shards --epochs 6 --num-samples 8 --registry weights/
  ray job submit --working-dir . -- python jobs/tune.py --shards s3://bucket/shards \\
      --storage-path s3://bucket/tune --use-gpu --max-concurrent 4

Every jobs/train.py flag sets the base of each trial (the search space YAML names the same
settings). Writes trials.csv / trials.md (every trial: config, best metric, epochs run,
status), trial_curves.png and best_config.yaml (usable as `jobs/train.py --config
best_config.yaml`) under <storage-path>/<name>; copies the best checkpoint into --registry.
Re-running the same --name resumes the search without rerunning finished trials.
"""

from __future__ import annotations

import sys

from dermanet.cli import run_job, settings_parser, setup_logging
from dermanet.runtime import check_storage_location, init_ray, quiet_ray_data_logs
from dermanet.settings import add_arguments, from_namespace
from dermanet.storage import join
from dermanet.train.settings import TrainSettings
from dermanet.train.tune import TuneSettings, run_tune

TRIAL_OWNED = ("storage_path", "name")  # each trial gets its own folder under the search


def build_parser():
    parser = settings_parser(__doc__, TuneSettings, address=False)
    groups = add_arguments(parser, TrainSettings, skip=TRIAL_OWNED)
    groups["run"].add_argument(
        "--address", help="Ray cluster to join; when unset: RAY_ADDRESS, else a new local Ray"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    base = from_namespace(TrainSettings, args, storage_path="outputs", name="trial")
    settings = from_namespace(TuneSettings, args, base=base)

    def work():
        settings.validate()
        check_storage_location(settings.storage_path)
        quiet_ray_data_logs()
        init_ray(address=args.address)
        return run_tune(settings)

    code, table = run_job(work, resume_hint=join(settings.storage_path, settings.name))
    if table is not None:
        print(table.to_string(index=False))
    return code


if __name__ == "__main__":
    sys.exit(main())
