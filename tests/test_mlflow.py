"""MLflow tracking against a real `mlflow server` (SQLite backend, over HTTP) and a local
`sqlite:///` store: training runs, resumes, Tune trials and the Model Registry."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import load_job

from dermanet.serving.runner import free_port
from dermanet.settings import plain_settings
from dermanet.train.settings import TrainSettings

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "dermanet_tiny.yaml")
SERVER_START_S = 120  # about 15-20 s on an idle 2-core machine


def _job_args(data: Path, storage: Path, name: str, epochs: int) -> list[str]:
    return [
        "--csv", str(data / "metadata.csv"), "--images", str(data / "images"),
        "--model-config", TINY, "--img-size", "40", "--batch-size", "16", "--epochs", str(epochs),
        "--num-workers", "1", "--warmup-epochs", "0", "--storage-path", str(storage),
        "--name", name,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on a free loopback port: SQLite backend, artifacts served over HTTP."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(root / "server.log", "wb")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start:\n{(root / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _single_run(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _steps(client, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_train_resume_and_export_are_tracked_on_a_server(
    ray_local, mlflow_server, synthetic_dir, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    train = load_job("train")
    runs = tmp_path / "runs"
    assert train.main(_job_args(synthetic_dir, runs, "tracked", epochs=1)) == 0
    # Re-running the same --name with one more epoch continues the same MLflow run.
    assert train.main(_job_args(synthetic_dir, runs, "tracked", epochs=2)) == 0

    client = _client(mlflow_server)
    run = _single_run(client, "dermanet-train")
    run_id, data = run.info.run_id, run.data
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    expected = plain_settings(TrainSettings(**{"csv": "x", "images": "y"}))
    assert set(expected) <= set(data.params), set(expected) - set(data.params)
    assert data.params["img_size"] == "40" and data.params["epochs"] == "1"
    assert data.tags["dermanet.resumed_with"] == "epochs=2"  # the first value stays the param
    for metric in ("val/balanced_accuracy", "val/macro_auroc", "val/recall_MEL", "val/loss",
                   "train/loss_epoch", "perf/train_images_per_sec"):  # fmt: skip
        assert _steps(client, run_id, metric) == [0, 1], metric  # each epoch exactly once
    output = runs / "tracked"
    assert data.tags["dermanet.run_folder"] == str(output)
    assert data.tags["ray.run_name"] == "tracked"
    assert data.tags["dermanet.best_checkpoint"] == str(output / "best.pt")
    assert data.tags["dermanet.last_checkpoint"] == str(output / "last.pt")
    assert json.loads((output / "mlflow_run.json").read_text())["run_id"] == run_id
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.csv", "training_curves.png", "confusion_matrix"} <= artifacts, artifacts
    matrices = {a.path for a in client.list_artifacts(run_id, "confusion_matrix")}
    assert matrices == {f"confusion_matrix/epoch_{e:03d}.png" for e in range(2)}

    # jobs/evaluate.py --export registers the shipped file, with its sha256 and scores.
    shipped = tmp_path / "registry" / "shipped.pt"
    evaluate = load_job("evaluate")
    code = evaluate.main(
        ["--checkpoint", str(output / "best.pt"), "--csv", str(synthetic_dir / "metadata.csv"),
         "--images", str(synthetic_dir / "images"), "--output", str(tmp_path / "eval"),
         "--export", str(shipped)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    (version,) = client.search_model_versions("name='shipped'")
    digest = hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert version.version == "1" and version.tags["sha256"] == digest
    assert float(version.tags["test_balanced_accuracy"]) == pytest.approx(
        report["official"]["balanced_accuracy"], abs=1e-5
    )
    evaluation = client.get_run(version.run_id)
    assert evaluation.data.metrics["test_macro_auroc"] == pytest.approx(
        report["metrics"]["macro_auroc"]
    )
    assert {a.path for a in client.list_artifacts(version.run_id, "report")} >= {
        "report/report.md", "report/report.json"
    }  # fmt: skip
    # The registered source is the very file that was shipped.
    import mlflow.artifacts

    copy = mlflow.artifacts.download_artifacts(version.source, dst_path=str(tmp_path / "dl"))
    assert hashlib.sha256(Path(copy).read_bytes()).hexdigest() == digest


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_local_sqlite_store_and_no_mlflow_import_when_unset(
    ray_local, synthetic_dir, tmp_path
) -> None:
    """jobs/train.py as a user runs it: with no URI, mlflow is never imported; with a relative
    `sqlite:///` URI the run lands in that file (the workers run in other folders)."""
    job = str(REPO / "jobs" / "train.py")
    untracked = _job_args(synthetic_dir, tmp_path / "runs", "untracked", epochs=1)
    local = _job_args(synthetic_dir, tmp_path / "runs", "local", epochs=2)
    address = ray_local.get_runtime_context().gcs_address
    script = f"""
import os, runpy, sys

def train(args):
    sys.argv = [{job!r}, *args, "--address", {address!r}]
    try:
        runpy.run_path({job!r}, run_name="__main__")
    except SystemExit as done:
        assert done.code == 0, done.code

train({untracked!r})
print("mlflow imported:", "mlflow" in sys.modules)
os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"
train({local!r})
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=270,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mlflow imported: False" in done.stdout
    assert not (tmp_path / "runs" / "untracked" / "mlflow_run.json").exists()

    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _single_run(client, "dermanet-train")
    assert run.data.params["name"] == "local" and run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "val/balanced_accuracy") == [0, 1]
    assert "training_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_tune_logs_one_run_per_trial(
    ray_local, mlflow_server, synthetic_dir, tmp_path, monkeypatch
) -> None:
    """Ray's MLflowLoggerCallback gives each trial a run; the trial's training opens none."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    space = tmp_path / "space.yaml"
    space.write_text("lr: {type: grid, values: [0.003]}\n")
    args = [
        *_job_args(synthetic_dir, tmp_path / "runs", "search", epochs=1),
        "--space", str(space), "--num-samples", "1", "--search-alg", "random",
    ]  # fmt: skip
    assert load_job("tune").main(args) == 0

    client = _client(mlflow_server)
    trial = _single_run(client, "search")
    trial_id = trial.data.tags["trial_name"].rsplit("_", 2)[-2:]
    assert trial.info.status == "FINISHED"
    assert trial.data.params["lr"] == "0.003" and trial.data.params["base/img_size"] == "40"
    assert _steps(client, trial.info.run_id, "val/balanced_accuracy") == [1]  # Tune's iteration
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_name for r in everything].count("_".join(trial_id)) == 0
