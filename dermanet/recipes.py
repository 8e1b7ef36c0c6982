"""A model's recipe as files: its stages run in order, each one an existing job, resumable.

A recipe (`configs/recipes/shipped.yaml`) lists stage files; a stage file names a job
(`jobs/<job>.py`) and that job's settings, by their setting names (`img_size`, not
`--img-size`), so every key is checked against the job's own settings before anything runs.
`{storage}` in a value is the run's storage folder and `{sample}` the derm-sample folder
(`dermanet.paths.sample_dir`).

`run_recipe` runs each stage as its job's command line in its own process (each job starts and
stops its own Ray, as a user's command would) and records every stage in
`<storage>/recipe-state.json`: a finished stage is skipped on a rerun; a stage that was started
and not finished (cut, failed, interrupted) runs again with the same command, and a training
stage then resumes from its last finished epoch through the job's own resume (same --name and
--storage-path).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dermanet.data.prepare import PrepareSettings
from dermanet.eval.evaluate import EvaluateSettings
from dermanet.inference.index_build import IndexSettings
from dermanet.paths import PROJECT_ROOT, sample_dir
from dermanet.settings import check_settings, flag_name, settings_fields
from dermanet.storage import atomic_write
from dermanet.train.settings import TrainSettings

STATE_FILE = "recipe-state.json"
STARTED, FAILED, FINISHED = "started", "failed", "finished"


class RecipeError(ValueError):
    """A recipe or stage file that cannot run as written (exit 2 on the command line)."""


@dataclass(frozen=True)
class JobSpec:
    """How a stage calls one job: its script, which settings it accepts, how it reruns."""

    script: str
    settings_type: type | None = None
    options: tuple[str, ...] = ()  # setting names of a job without a settings dataclass
    positional: tuple[str, ...] = ()
    rerun: dict[str, Any] = field(default_factory=dict)  # added when a cut stage runs again

    @property
    def invocation(self) -> list[str]:
        """How Python runs it from the project root: a job as its script, a tool (`tools/`, a
        package outside the runtime) as a module."""
        if self.script.startswith("tools/"):
            return ["-m", self.script.removesuffix(".py").replace("/", ".")]
        return [self.script]

    def names(self) -> set[str]:
        """Every setting name the job's command line takes."""
        if self.settings_type is None:
            return set(self.options)
        return {f.name for f in settings_fields(self.settings_type)} | set(self.options)

    def default(self, name: str) -> Any:
        if self.settings_type is None:
            return None
        for f in dataclasses.fields(self.settings_type):
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
        return None


JOBS: dict[str, JobSpec] = {
    # A cut prepare leaves part of its shards; its rerun replaces them.
    "prepare_data": JobSpec(
        "jobs/prepare_data.py", PrepareSettings, ("num_cpus",), rerun={"overwrite": True}
    ),
    "train": JobSpec("jobs/train.py", TrainSettings),
    "evaluate": JobSpec("jobs/evaluate.py", EvaluateSettings),
    "average_weights": JobSpec(
        "jobs/average_weights.py",
        options=("checkpoints", "output", "img_size"),
        positional=("checkpoints",),
    ),
    "build_ood_set": JobSpec(
        "tools/build_ood_set.py", options=("output", "derm_sample", "seed", "chromium")
    ),
    "build_index": JobSpec("jobs/build_index.py", IndexSettings),
}


@dataclass(frozen=True)
class Stage:
    """One step of a recipe: a job and its settings (placeholders not yet filled in)."""

    name: str
    job: str
    settings: dict[str, Any]
    env: dict[str, str]
    source: Path

    @property
    def spec(self) -> JobSpec:
        return JOBS[self.job]

    def resolved(self, storage: str, *, rerun: bool = False) -> dict[str, Any]:
        """The settings with `{storage}` and `{sample}` filled in (and rerun extras)."""
        values = {k: _fill(v, storage) for k, v in self.settings.items()}
        return {**values, **self.spec.rerun} if rerun else values

    def argv(self, storage: str, *, rerun: bool = False) -> list[str]:
        """The job's command-line arguments for these settings."""
        spec = self.spec
        values = self.resolved(storage, rerun=rerun)
        positional = [str(v) for k in spec.positional for v in _as_list(values.get(k))]
        flags: list[str] = []
        for key, value in values.items():
            if key in spec.positional or value is None:
                continue
            flag = flag_name(key)
            if isinstance(value, bool):
                if value:
                    flags.append(flag)
                elif spec.default(key) is not False:
                    flags.append("--no-" + flag[2:])
            elif isinstance(value, list):
                flags += [flag, *map(str, value)]
            else:
                flags += [flag, str(value)]
        return positional + flags

    def command(self, storage: str, *, rerun: bool = False) -> list[str]:
        """The whole command line, as `python jobs/<job>.py ...` from the project root."""
        return [sys.executable, *self.spec.invocation, *self.argv(storage, rerun=rerun)]

    def settings_object(self, storage: str) -> Any:
        """The job's settings dataclass of this stage, checked by its rules (range, choices);
        None for a job without one."""
        spec = self.spec
        if spec.settings_type is None:
            return None
        names = {f.name for f in settings_fields(spec.settings_type)}
        values = {k: v for k, v in self.resolved(storage).items() if k in names}
        try:
            settings = spec.settings_type(**values)
        except TypeError as exc:
            raise RecipeError(f"{self.source}: {exc}") from exc
        try:
            check_settings(settings)
        except ValueError as exc:
            raise RecipeError(f"{self.source}: {exc}") from exc
        return settings


@dataclass(frozen=True)
class Recipe:
    path: Path
    description: str
    stages: tuple[Stage, ...]

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _fill(value: Any, storage: str) -> Any:
    if isinstance(value, str):
        return value.replace("{storage}", storage).replace("{sample}", str(sample_dir()))
    if isinstance(value, list):
        return [_fill(v, storage) for v in value]
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError as exc:
        raise RecipeError(f"no such recipe file: {path}") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping")
    return data


def load_stage(path: Path) -> Stage:
    """A stage file: `job`, `settings` (the job's setting names), optional `env` and `name`
    (default: the file's stem). Unknown jobs, keys and settings are refused by name."""
    data = _read_yaml(path)
    unknown = sorted(set(data) - {"job", "settings", "env", "name"})
    if unknown:
        raise RecipeError(f"{path}: unknown keys {unknown}; a stage has job, settings, env, name")
    job = data.get("job")
    if job not in JOBS:
        raise RecipeError(f"{path}: job must be one of {sorted(JOBS)}, got {job!r}")
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise RecipeError(f"{path}: settings must be a mapping of setting names to values")
    valid = JOBS[job].names()
    wrong = sorted(set(settings) - valid)
    if wrong:
        raise RecipeError(f"{path}: {job} has no settings {wrong}; valid: {sorted(valid)}")
    env = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
    return Stage(str(data.get("name") or path.stem), job, settings, env, path)


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file: `description` and `stages`, stage files relative to the recipe's folder."""
    path = Path(path)
    data = _read_yaml(path)
    files = data.get("stages")
    if not isinstance(files, list) or not files:
        raise RecipeError(f"{path}: 'stages' must list the stage files in order")
    stages = tuple(load_stage(path.parent / str(f)) for f in files)
    names = [s.name for s in stages]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise RecipeError(f"{path}: stage names must be unique, repeated: {twice}")
    return Recipe(path, str(data.get("description", "")).strip(), stages)


def check_recipe(recipe: Recipe, storage: str) -> None:
    """Every stage's settings through its job's rules, before any stage runs."""
    for stage in recipe.stages:
        stage.settings_object(storage)


def load_state(storage: Path) -> dict[str, Any]:
    import json

    path = storage / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    return json.loads(path.read_text())


def _save_state(storage: Path, state: dict[str, Any]) -> None:
    import json

    atomic_write(storage / STATE_FILE, json.dumps(state, indent=2).encode())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def shell_line(stage: Stage, storage: str) -> str:
    """The stage as a command a person can paste (env prefix, python, job, flags)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in stage.env.items()]
    return " ".join([*env, "python", *map(shlex.quote, stage.command(storage)[1:])])


def run_recipe(
    recipe: Recipe,
    storage: str | Path,
    *,
    until: str | None = None,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
) -> int:
    """Run the recipe's stages in order (up to `until`); the exit code of a stage that
    fails, 130 when interrupted, else 0. Finished stages are skipped."""
    root = Path(storage).resolve()
    where = str(root)
    if until is not None and until not in recipe.stage_names():
        raise RecipeError(f"--until: no stage {until!r}; stages: {recipe.stage_names()}")
    check_recipe(recipe, where)
    state = load_state(root)
    state["recipe"] = str(recipe.path)
    for stage in _stages_until(recipe.stages, until):
        record = state["stages"].get(stage.name)
        command = stage.command(where)
        if record and record["status"] == FINISHED:
            if record["command"][1:] != command[1:]:
                raise RecipeError(
                    f"stage {stage.name} finished in {where} with another command; give a new "
                    "--storage-path to run the changed recipe"
                )
            echo(f"stage {stage.name}: finished {record['finished_at']}, skipped")
            continue
        rerun = record is not None
        if dry_run:
            status = f" ({record['status']}: reruns)" if rerun else ""
            echo(f"# stage {stage.name}{status}\n{shell_line(stage, where)}")
            continue
        code = _run_stage(stage, where, rerun, state, root, echo)
        if code != 0:
            return code
    return 0


def _stages_until(stages: Iterable[Stage], until: str | None) -> list[Stage]:
    chosen = []
    for stage in stages:
        chosen.append(stage)
        if stage.name == until:
            break
    return chosen


def _run_stage(
    stage: Stage, where: str, rerun: bool, state: dict[str, Any], root: Path, echo
) -> int:
    ran = stage.command(where, rerun=rerun)
    record = state["stages"].setdefault(stage.name, {"runs": 0})
    record.update(
        status=STARTED, job=stage.job, command=stage.command(where), ran=ran, started_at=_now()
    )
    record["runs"] += 1
    _save_state(root, state)
    echo(f"stage {stage.name}: {'rerun' if rerun else 'run'}: {shell_line(stage, where)}")
    process = subprocess.Popen(ran, cwd=PROJECT_ROOT, env={**os.environ, **stage.env})
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()
        echo(f"interrupted in stage {stage.name}: rerun the same command to resume it")
        return 130
    if code != 0:
        record.update(status=FAILED, exit_code=code)
        _save_state(root, state)
        echo(
            f"stage {stage.name} failed (exit {code}): fix what it says and rerun the same "
            "command; finished stages are skipped, a training stage resumes at its last epoch"
        )
        return code
    record.update(status=FINISHED, exit_code=0, finished_at=_now())
    _save_state(root, state)
    return 0
