"""MLflow tracking of training, tuning and exports, on only when `MLFLOW_TRACKING_URI` is set.

MLflow's own convention picks the server (or a local `sqlite:///` file); unset, every entry
point here is a no-op and `mlflow` is never imported. Ray's integration does the logging:
`setup_mlflow` on the rank-0 Train worker, `MLflowLoggerCallback` on the Tuner.

A Ray Train job has one MLflow run. The driver opens it (so a relative `sqlite:///` path and
the default artifact folder resolve where the user started the job, not in a worker's folder),
keeps its id in `<run folder>/mlflow_run.json` so re-running the same `--name` continues the
same run, and at the end adds the run folder, the checkpoints and the curves. Rank 0 attaches to
it with `setup_mlflow`, which logs every setting as a parameter, and `RayTrainReporter` hands it
each epoch's metrics (`step=epoch`) once the epoch's checkpoint is reported; an epoch the run
already has (a resume, a retried worker group) is not logged again.

`jobs/evaluate.py --export` registers the exported file in MLflow's Model Registry.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from dermanet.settings import plain_settings
from dermanet.storage import exists, join, read_json, write_json

log = logging.getLogger(__name__)
URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
RUN_FILE = "mlflow_run.json"  # in the Ray run folder: the resume key of the MLflow run
# MLflow 2.x servers refuse longer parameter values; 3.x raised the limit.
MAX_PARAM_LENGTH = 500
# Keys MLflow accepts: letters, digits, _ - . space / (and : on Linux).
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")
CHECKPOINT_FIELDS = ("best_checkpoint", "last_checkpoint", "backbone")  # outcome attributes
LOG_FILES = ("metrics.csv", "training_curves.png", "byol_curves.png")


def tracking_uri() -> str | None:
    """MLflow's tracking URI from the environment, with local paths made absolute.

    Ray workers and Tune trials run in other working folders: `sqlite:///runs.db` or
    `./mlruns` must name the file the user meant, wherever MLflow opens it.
    """
    uri = os.environ.get(URI_ENV, "").strip()
    if not uri:
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    if uri.startswith("file:") and not uri.startswith("file:///"):
        uri = uri.removeprefix("file:")
    if "://" not in uri and not uri.startswith(("databricks", "uc")):
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def enabled() -> bool:
    return tracking_uri() is not None


def metric_key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", name)


def run_params(settings: Any) -> dict[str, str]:
    """Every setting of a job as an MLflow parameter (values cut to MLflow's limit)."""
    return {metric_key(k): str(v)[:MAX_PARAM_LENGTH] for k, v in plain_settings(settings).items()}


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports leave the site
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created on first use (two jobs creating it at once both get it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


class JobRun:
    """The driver's side of one Ray Train job's MLflow run; a no-op when tracking is off.

    Used as `with run: ...` around `trainer.fit()` and the export, it ends the run FAILED
    (KILLED on Ctrl-C) if they raise; `finish` adds tags and artifacts and ends it FINISHED.
    """

    def __init__(self, kind: str, settings: Any, output: str, enabled: bool = True):
        self.uri = tracking_uri() if enabled else None
        self.run_id: str | None = None
        self.output = output
        if self.uri is None:
            return
        self.client = _client(self.uri)
        self.params = run_params(settings)
        experiment = os.environ.get(EXPERIMENT_ENV) or f"dermanet-{kind}"
        self.experiment_id = _experiment_id(self.client, experiment)
        self.run_id = self._resumed_run()
        tags = {"dermanet.job": kind, "dermanet.run_folder": output, "ray.run_name": settings.name}
        if self.run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=settings.name, tags=tags)
            self.run_id = run.info.run_id
            write_json(join(output, RUN_FILE), {"run_id": self.run_id, "tracking_uri": self.uri})
        else:
            self._drop_changed_params()
            self.client.update_run(self.run_id, status="RUNNING")
        log.info("MLflow run %s in experiment %r at %s", self.run_id, experiment, self.uri)

    def _resumed_run(self) -> str | None:
        """The run this run folder logged to before, if it is on this tracking server."""
        from mlflow.exceptions import MlflowException

        path = join(self.output, RUN_FILE)
        if not exists(path):
            return None
        run_id = read_json(path).get("run_id")
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s of %s is not on %s: starting a new one", run_id,
                        self.output, self.uri)  # fmt: skip
            return None
        return run_id if run.info.lifecycle_stage == "active" else None

    def _drop_changed_params(self) -> None:
        """MLflow refuses to change a logged parameter: a resume with other settings (e.g.
        more --epochs) keeps the first values and records the new ones as a tag."""
        logged = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in self.params.items() if k in logged and logged[k] != v}
        if changed:
            note = ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))
            self.client.set_tag(self.run_id, "dermanet.resumed_with", note[:5000])
            self.params = {k: v for k, v in self.params.items() if k not in changed}

    def worker_config(self) -> dict[str, Any] | None:
        """What rank 0 needs to attach to this run (plain values: it travels to the workers)."""
        if self.run_id is None:
            return None
        return {
            "tracking_uri": self.uri,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "params": self.params,
        }

    def finish(self, log_dir: Path, outcome: Any) -> None:
        """Tag the run folder and checkpoints, upload the logs and curves, end the run."""
        if self.run_id is None:
            return
        for field in CHECKPOINT_FIELDS:
            value = getattr(outcome, field, None)
            if isinstance(value, str | Path):
                self.client.set_tag(self.run_id, f"dermanet.{field}", str(value))
        for name in LOG_FILES:
            if (log_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(log_dir / name))
        if (log_dir / "confusion_matrix").is_dir():
            self.client.log_artifacts(self.run_id, str(log_dir / "confusion_matrix"),
                                      "confusion_matrix")  # fmt: skip
        self.client.set_terminated(self.run_id, "FINISHED")

    def __enter__(self) -> JobRun:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None and self.run_id is not None:
            status = "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
            self.client.set_terminated(self.run_id, status)


class EpochLog:
    """Rank 0's side of a job's run: each epoch's metrics, `step=epoch`, each epoch once.

    `RayTrainReporter` calls it after the epoch's checkpoint is reported, so an epoch logged
    here is never trained again by a resume.
    """

    def __init__(self, config: Mapping[str, Any]):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from ray.air.integrations.mlflow import setup_mlflow

        os.environ["MLFLOW_RUN_ID"] = config["run_id"]  # attach to the driver's run
        self.mlflow = setup_mlflow(
            config=dict(config["params"]),
            tracking_uri=config["tracking_uri"],
            experiment_id=config["experiment_id"],
        )
        history = self.mlflow.MlflowClient().get_metric_history(config["run_id"], "epoch")
        self.logged = {int(m.step) for m in history}

    def __call__(self, metrics: Mapping[str, float]) -> None:
        epoch = int(metrics["epoch"])
        if epoch in self.logged:
            return
        finite = {metric_key(k): float(v) for k, v in metrics.items() if math.isfinite(v)}
        self.mlflow.log_metrics(finite, step=epoch)
        self.logged.add(epoch)


def epoch_log(config: Mapping[str, Any] | None) -> EpochLog | None:
    """The epoch logger of a Train worker: rank 0 of a tracked job only, else None."""
    import ray.train

    if not config or ray.train.get_context().get_world_rank() != 0:
        return None
    return EpochLog(config)


def tune_callbacks(experiment: str, search_folder: str) -> list[Any]:
    """Ray's `MLflowLoggerCallback` for a Tuner: one MLflow run per trial (its config as
    parameters, every reported epoch as metrics), in one experiment for the search."""
    uri = tracking_uri()
    if uri is None:
        return []
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [
        MLflowLoggerCallback(
            tracking_uri=uri,
            experiment_name=os.environ.get(EXPERIMENT_ENV) or experiment,
            tags={"dermanet.job": "tune", "dermanet.run_folder": search_folder},
        )
    ]


def register_export(model: Path, report_dir: Path, scores: Mapping[str, Any]) -> str | None:
    """An exported model as a new version in MLflow's Model Registry; its version number.

    An evaluation run holds the report and the model file; the registered model is named
    after the file (`weights/default.pt` -> `default`), each export a version carrying the
    file's sha256 and the scores.
    """
    uri = tracking_uri()
    if uri is None:
        return None
    from dermanet.storage import file_sha256

    client = _client(uri)
    experiment = os.environ.get(EXPERIMENT_ENV) or "dermanet-evaluate"
    tags = {"dermanet.job": "evaluate", "dermanet.model_file": str(model)}
    run = client.create_run(_experiment_id(client, experiment), run_name=model.stem, tags=tags)
    run_id = run.info.run_id
    digest = file_sha256(model)
    numbers = {
        metric_key(k): float(v)
        for k, v in scores.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    try:
        for key, value in numbers.items():
            client.log_metric(run_id, key, value)
        for name in ("report.md", "report.json", "confusion_matrix.png", "roc_curves.png",
                     "reliability.png"):  # fmt: skip
            if (report_dir / name).is_file():
                client.log_artifact(run_id, str(report_dir / name), "report")
        client.log_artifact(run_id, str(model), "model")
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(model.stem)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            model.stem,
            source=f"{run.info.artifact_uri}/model/{model.name}",
            run_id=run_id,
            tags={"sha256": digest, **{k: f"{v:.6g}" for k, v in numbers.items()}},
            description=f"{model.name}, sha256 {digest}",
        )
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_tag(run_id, "sha256", digest)
    client.set_terminated(run_id, "FINISHED")
    log.info("registered %s as MLflow model %r version %s", model, model.stem, version.version)
    return str(version.version)
