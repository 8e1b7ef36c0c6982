"""What every job's command line shares: flags generated from its settings, one error handling.

`settings_parser` builds the parser of a job from its settings dataclass (plus --config and
--address where they apply); `run_job` turns what can go wrong into an exit code and a message
a person can act on: bad input exits 2, a training failure exits 1 with the resume command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dermanet.settings import add_arguments, from_namespace, load_settings_yaml

ADDRESS_HELP = "Ray cluster to join; when unset: RAY_ADDRESS, else a new local Ray"
T = TypeVar("T")


def add_address_argument(parser: argparse.ArgumentParser | Any) -> None:
    """--address: join a running cluster instead of starting a local Ray."""
    parser.add_argument("--address", help=ADDRESS_HELP)


def settings_parser(
    doc: str,
    settings_type: type,
    *,
    config_file: bool = False,
    address: bool = True,
    skip: Sequence[str] = (),
) -> argparse.ArgumentParser:
    """A job's parser: its docstring as description/epilog, one flag per setting."""
    lines = doc.strip().splitlines()
    parser = argparse.ArgumentParser(
        description=lines[0],
        epilog="\n".join(lines[1:]).strip() or None,
        formatter_class=HelpFormatter,
    )
    if config_file:
        parser.add_argument(
            "--config",
            help="YAML of settings (e.g. jobs/tune.py's best_config.yaml); flags override it",
        )
    groups = add_arguments(parser, settings_type, skip=skip)
    if address:
        add_address_argument(groups.get("run", parser))
    return parser


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every flag's help, examples in the epilog kept as written."""


def parse_settings(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, settings_type: type, **extra: Any
) -> tuple[Any, argparse.Namespace]:
    """Parse flags (over `--config` YAML values, when the parser has that flag)."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        parser.set_defaults(**load_settings_yaml(args.config, settings_type))
        args = parser.parse_args(argv)
    return from_namespace(settings_type, args, **extra), args


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def run_job(work: Callable[[], T], resume_hint: str | None = None) -> tuple[int, T | None]:
    """Run a job; (exit code, result). Errors are printed as one line, never a traceback.

    2: the input is wrong (missing files, malformed CSVs, bad settings) - fix it and rerun.
    1: training failed after its retries - rerun the same command to resume (`resume_hint`).
    130: interrupted - finished epochs are kept, rerun to resume.
    """
    from ray.train import TrainingFailedError

    from dermanet.data.catalogue import CatalogueError

    try:
        return 0, work()
    except (CatalogueError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2, None
    except TrainingFailedError as exc:
        summary = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f" Finished epochs are checkpointed in {resume_hint}:" if resume_hint else ""
        print(
            f"error: training failed after its worker-group retries ({summary}).{where} rerun "
            "the same command to resume (raise --max-failures if workers were killed, e.g. "
            "for memory).",
            file=sys.stderr,
        )
        return 1, None
    except KeyboardInterrupt:
        where = f" in {resume_hint}" if resume_hint else ""
        print(f"interrupted: finished epochs are kept{where}; rerun to resume", file=sys.stderr)
        return 130, None
