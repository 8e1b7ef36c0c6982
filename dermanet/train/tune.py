"""Hyperparameter search with Ray Tune over supervised Ray Train runs (jobs/tune.py).

Each trial is `run_training` (a TorchTrainer) inside a Tune function trainable, with Ray's
TuneReportCallback forwarding every epoch's metrics to Tune (`Tuner(trainer)` is gone in Ray
Train V2). ASHA stops weak trials early; Optuna proposes configs from finished ones.
Re-running the same experiment restores it (`Tuner.restore`): finished trials are not rerun.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from dermanet.eval.plots import save_figure
from dermanet.settings import HIDDEN, check_settings, option, plain_settings, settings_fields
from dermanet.storage import copy_file, is_uri, join
from dermanet.tracking import tune_callbacks
from dermanet.train.job import monitor_mode
from dermanet.train.reporting import MODEL_FILE
from dermanet.train.settings import TrainSettings
from dermanet.train.supervised import run_training

log = logging.getLogger(__name__)
DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "configs" / "tune_space.yaml"
SEARCHABLE = {f.name for f in settings_fields(TrainSettings)}
SEARCH_ALGS = ("optuna", "random")


@dataclass
class TuneSettings:
    """jobs/tune.py's own flags. `base` holds the TrainSettings every trial starts from (its
    flags are jobs/train.py's; the space YAML names the same fields; --seed seeds the search
    as well as each trial)."""

    space: str = option(str(DEFAULT_SPACE), "search space YAML", group="search")
    name: str = option("dermanet-tune", "experiment name (resume key)", group="search")
    storage_path: str = option("outputs", "folder or URI for results", group="search")
    num_samples: int = option(8, "number of trials", group="search", minimum=1)
    max_concurrent: int = option(1, "trials running at once", group="search", minimum=1)
    grace_period: int = option(1, "ASHA: epochs before a trial may stop", group="search",
                               minimum=1)  # fmt: skip
    reduction_factor: int = option(2, "ASHA: keep 1/rf of trials per rung", group="search",
                                   minimum=2)  # fmt: skip
    search_alg: str = option("optuna", "search algorithm", group="search", choices=SEARCH_ALGS)
    trial_cpus: float = option(0.1, "CPUs of each trial's driver", group="search", minimum=0,
                               exclusive=True)  # fmt: skip
    registry: str | None = option(
        None, "model registry folder to copy the best checkpoint into", group="search"
    )
    base: TrainSettings = field(default_factory=TrainSettings, metadata={"group": HIDDEN})

    @property
    def seed(self) -> int:
        return self.base.seed

    def validate(self) -> None:
        check_settings(self)
        self.base.validate()


def load_space(path: str | Path) -> dict[str, Any]:
    """YAML search space -> Tune distributions; unknown fields are refused by name."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = sorted(set(raw) - SEARCHABLE)
    if unknown:
        raise ValueError(
            f"{path}: {unknown} are not training settings; valid: {sorted(SEARCHABLE)}"
        )
    space: dict[str, Any] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict):
            space[name] = spec
            continue
        kind = spec.get("type")
        if kind == "loguniform":
            space[name] = tune.loguniform(float(spec["low"]), float(spec["high"]))
        elif kind == "uniform":
            space[name] = tune.uniform(float(spec["low"]), float(spec["high"]))
        elif kind == "choice":
            space[name] = tune.choice(list(spec["values"]))
        elif kind == "grid":
            space[name] = tune.grid_search(list(spec["values"]))
        else:
            raise ValueError(f"{path}: {name} has unknown type {kind!r} "
                             "(loguniform, uniform, choice, grid)")  # fmt: skip
    return space


def _trial(config: dict[str, Any]) -> None:
    """One trial: a full supervised run whose epochs Tune sees as iterations."""
    base = TrainSettings(**config["base"])
    overrides = {k: v for k, v in config.items() if k != "base"}
    trial_id = tune.get_context().get_trial_id()  # runs land in <experiment>/trials/<id>/
    settings = dataclasses.replace(base, **overrides, name=trial_id, max_failures=0)
    # The Tuner's MLflowLoggerCallback gives the trial its MLflow run: no second one here.
    run_training(settings, run_callbacks=[TuneReportCallback()], tracked=False)


def trial_dirname(trial: Trial) -> str:
    """Short trial folders (Tune's default name embeds the whole flattened base config)."""
    return f"trial_{trial.trial_id}"


def run_tune(settings: TuneSettings) -> pd.DataFrame:
    """Run (or resume) the search; write results table, curves, best config, best checkpoint."""
    metric = settings.base.monitor
    storage = (
        settings.storage_path
        if is_uri(settings.storage_path)
        else str(Path(settings.storage_path).expanduser().resolve())
    )
    experiment = join(storage, settings.name)
    trials_dir = join(experiment, "trials")
    trainable = tune.with_resources(_trial, {"CPU": settings.trial_cpus})
    if tune.Tuner.can_restore(experiment):
        log.info("resuming the search in %s (finished trials are kept)", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        searcher = (
            OptunaSearch(seed=settings.seed)
            if settings.search_alg == "optuna"
            # Given our own generator, Tune does not apply max_concurrent_trials to it.
            else BasicVariantGenerator(
                random_state=settings.seed, max_concurrent=settings.max_concurrent
            )
        )
        tuner = tune.Tuner(
            trainable,
            param_space={
                "base": plain_settings(
                    dataclasses.replace(
                        settings.base.with_absolute_paths(), storage_path=trials_dir
                    )
                ),
                **load_space(settings.space),
            },
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=monitor_mode(metric),
                num_samples=settings.num_samples,
                max_concurrent_trials=settings.max_concurrent,
                search_alg=searcher,
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=settings.base.epochs,
                    grace_period=settings.grace_period,
                    reduction_factor=settings.reduction_factor,
                ),
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=storage,
                callbacks=tune_callbacks(settings.name, experiment),
            ),
        )
    results = tuner.fit()
    table = trial_table(results, metric, max_epochs=settings.base.epochs)
    _write_outputs(results, table, metric, experiment, settings)
    return table


def trial_table(results: tune.ResultGrid, metric: str, max_epochs: int) -> pd.DataFrame:
    """One row per trial: searched config, best metric, epochs run, status.

    Status: "completed" (ran all `max_epochs`), "stopped early" (ASHA cut it), "error", or
    "no result" (never reported a metric).
    """
    rows = []
    for result in results:
        history = result.metrics_dataframe
        if history is None:
            history = pd.DataFrame()
        config = {k: v for k, v in (result.config or {}).items() if k != "base"}
        best = math.nan
        if metric in history:
            best = history[metric].min() if monitor_mode(metric) == "min" else history[metric].max()
        epochs = int(history["training_iteration"].max()) if "training_iteration" in history else 0
        status = (
            "error"
            if result.error
            else "no result"
            if not epochs
            else "completed"
            if epochs >= max_epochs
            else "stopped early"
        )
        rows.append({"trial": Path(result.path).name, **config, f"best {metric}": best,
                     "epochs": epochs, "status": status})  # fmt: skip
    ascending = monitor_mode(metric) == "min"
    return pd.DataFrame(rows).sort_values(f"best {metric}", ascending=ascending, na_position="last")


def _write_outputs(
    results: tune.ResultGrid, table: pd.DataFrame, metric: str, experiment: str, s: TuneSettings
) -> None:
    if table[f"best {metric}"].isna().all():
        raise RuntimeError(
            f"every trial failed before reporting {metric}; see the errors in {experiment}"
        )
    out = Path(tempfile.mkdtemp(prefix="dermanet-tune-"))  # then copied to the experiment
    table.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(table.to_string(index=False) + "\n")
    save_figure(_curves_figure(results, metric), out / "trial_curves.png")
    best = results.get_best_result(metric=metric, mode=monitor_mode(metric), scope="all")
    best_settings = {**best.config["base"], **{k: v for k, v in best.config.items() if k != "base"}}
    best_settings.pop("storage_path", None)
    best_settings.pop("name", None)
    (out / "best_config.yaml").write_text(yaml.safe_dump(best_settings, sort_keys=True))
    for file in out.iterdir():
        copy_file(file, join(experiment, file.name))
    shutil.rmtree(out, ignore_errors=True)
    if s.registry:
        # The epoch with the best metric; Train keeps it (CheckpointConfig keeps the top 2).
        history = best.metrics_dataframe
        row = history.loc[
            history[metric].idxmin() if monitor_mode(metric) == "min" else history[metric].idxmax()
        ]
        copy_file(join(row["checkpoint_path"], MODEL_FILE), join(s.registry, f"{s.name}-best.pt"))
    log.info("best trial %s: %s = %.4f", Path(best.path).name, metric, best.metrics.get(metric))


def _curves_figure(results: tune.ResultGrid, metric: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        history = result.metrics_dataframe
        if history is not None and metric in history:
            ax.plot(history["training_iteration"], history[metric], marker="o",
                    label=Path(result.path).name)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("Trials (ASHA stops the weak ones early)")
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
