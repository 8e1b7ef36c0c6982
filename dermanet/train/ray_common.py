"""What every Ray Train job here shares: run folders, the Lightning Trainer, resume, the driver.

Supervised fine-tuning (`supervised.py`) and BYOL pretraining (`pretrain.py`) differ in their
LightningModule, data and exported artefact; everything in this module is the same for both,
so it lives here once (a fix to resuming or to the DDP setup reaches both jobs).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import ray
import ray.train
from lightning.pytorch.loggers import TensorBoardLogger
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
from ray.train.torch import TorchTrainer

from dermanet.storage import is_uri, join
from dermanet.train.reporting import LIGHTNING_CKPT

log = logging.getLogger(__name__)
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
METRICS_CSV = "metrics.csv"


def experiment_dir(storage_path: str, name: str) -> str:
    """`<storage>/<name>`: Ray's run folder (the resume key), where exports and logs also go."""
    storage = (
        storage_path if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
    )
    return join(storage, name)


def plain_settings(settings: Any, exclude: Sequence[str] = ("extra_callbacks",)) -> dict[str, Any]:
    """A settings dataclass as plain values (no callback objects): provenance, worker config."""
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.name not in exclude
    }


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """float16 autocast needs a GPU; on CPU bf16 is the mixed precision that works."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    if not use_gpu and precision == "16-mixed":
        log.warning("16-mixed needs a GPU; using bf16-mixed on CPU")
        return "bf16-mixed"
    return precision


def local_log_dir(output: str, log_dir: str | None = None) -> Path:
    """Where per-epoch CSV/PNG logs go: `log_dir`, else `<output>/logs` (a temp folder for URIs)."""
    if log_dir:
        return Path(log_dir).expanduser().resolve()
    base = output if not is_uri(output) else tempfile.mkdtemp(prefix="dermanet-logs-")
    return Path(base) / "logs"


def lightning_trainer(
    *,
    max_epochs: int,
    use_gpu: bool,
    precision: str,
    grad_clip: float,
    callbacks: list[pl.Callback],
    log_dir: Path,
    accumulate_grad_batches: int = 1,
    log_every_n_steps: int = 10,
) -> pl.Trainer:
    """A Lightning Trainer wired into Ray Train: Ray's DDP strategy and cluster environment.

    Checkpointing is the reporter callback's job (Ray owns the checkpoint folders), Ray Data
    already shards the data (no distributed sampler) and only rank 0 draws a progress bar.
    """
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        accelerator="gpu" if use_gpu else "cpu",
        devices="auto",
        strategy=RayDDPStrategy(find_unused_parameters=False),
        plugins=[RayLightningEnvironment()],
        precision=precision,
        gradient_clip_val=grad_clip or None,
        accumulate_grad_batches=accumulate_grad_batches,
        callbacks=callbacks,
        logger=TensorBoardLogger(log_dir, name="tensorboard", version=""),
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every_n_steps,
        use_distributed_sampler=False,
        enable_progress_bar=ray.train.get_context().get_world_rank() == 0,
    )
    return prepare_trainer(trainer)


def resume_checkpoint_path() -> str | None:
    """The Lightning state of Ray's latest checkpoint (a rerun or a retried worker group)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="dermanet-resume-"))
    checkpoint.to_directory(str(local))
    return str(local / LIGHTNING_CKPT)


def torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    datasets: dict[str, ray.data.Dataset],
    *,
    output: str,
    storage_path: str,
    name: str,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    checkpoint_config: CheckpointConfig,
    run_callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """The driver side: workers with fractional CPUs (STACK.md), retries, Ray's run folder.

    `run_callbacks` go to Ray's RunConfig (Ray Tune passes its TuneReportCallback there).
    """
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(output).parent) if not is_uri(output) else storage_path,
            checkpoint_config=checkpoint_config,
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=run_callbacks or [],
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
    )


def raise_on_failure(result: ray.train.Result, output: str) -> ray.train.Checkpoint:
    """The run's latest checkpoint, or the run's own error / a clear one when there is none."""
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the logs in {output}")
    return result.checkpoint


def plot_history(log_dir: Path, columns: list[str], filename: str) -> Path | None:
    """Plot metrics.csv columns against epoch into `log_dir/filename` (local log folders only)."""
    from dermanet.eval.plots import save_figure, training_curves_figure

    csv = log_dir / METRICS_CSV
    if not csv.is_file():
        return None
    history = pd.read_csv(csv)
    return save_figure(training_curves_figure(history, columns), log_dir / filename)
