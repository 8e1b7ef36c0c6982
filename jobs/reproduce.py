"""Run a model's recipe (configs/recipes/*.yaml): its stages in order, each an existing job.

examples:
  python jobs/reproduce.py configs/recipes/shipped.yaml --storage-path /data/dn --dry-run
  python jobs/reproduce.py configs/recipes/shipped.yaml --storage-path /data/dn
  python jobs/reproduce.py configs/recipes/shipped.yaml --storage-path /data/dn --until 01-shards160

Stage states are kept in <storage-path>/recipe-state.json. Rerunning the same command skips
finished stages and runs a cut one again; a cut training stage resumes at its last finished
epoch (the job's own resume: same --name and --storage-path).
"""

from __future__ import annotations

import argparse
import sys

from dermanet.cli import HelpFormatter, run_job, setup_logging
from dermanet.recipes import load_recipe, run_recipe


def build_parser() -> argparse.ArgumentParser:
    lines = __doc__.strip().splitlines()
    p = argparse.ArgumentParser(
        description=lines[0], epilog="\n".join(lines[1:]).strip(), formatter_class=HelpFormatter
    )
    p.add_argument("recipe", help="recipe YAML listing its stage files")
    p.add_argument(
        "--storage-path",
        required=True,
        help="local folder for every stage's output and the stage states ({storage} in stages)",
    )
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--dry-run", action="store_true", help="print the stages' commands, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def work() -> int:
        recipe = load_recipe(args.recipe)
        return run_recipe(recipe, args.storage_path, until=args.until, dry_run=args.dry_run)

    code, stages_code = run_job(work)
    return code if stages_code is None else stages_code


if __name__ == "__main__":
    sys.exit(main())
