"""One Ray Train job template: the driver outline and the per-worker loop, written once.

A job variant (supervised fine-tuning, BYOL) is a small subclass of `TrainingJob` that supplies
only what differs (solo-learn's `BaseMethod` idea): its settings type, its data, its
LightningModule, what each checkpoint folder holds and what is copied out at the end.

Driver (`TrainingJob.run`): validate → data → Ray Data pipelines → run folder and provenance →
`TorchTrainer` → export. Workers (`TrainingJob.worker`): seed, module, the shared callbacks
(throughput, reporter, gradient monitor, console), a Lightning Trainer on Ray's DDP strategy,
batches from `ray.train.get_dataset_shard`, resume from Ray's latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import pandas as pd
import ray
import ray.data
import ray.train
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer
from ray.train.torch import TorchTrainer

from dermanet.data.pipelines import Mode, NormalizedBatches, PipelineConfig, build_pipeline
from dermanet.settings import plain_settings
from dermanet.storage import is_uri, join
from dermanet.tracking import JobRun, epoch_log
from dermanet.train.console import ConsoleProgress, quiet_worker_logs
from dermanet.train.monitor import GradientMonitor
from dermanet.train.reporting import LIGHTNING_CKPT, RayTrainReporter
from dermanet.train.settings import RunSettings
from dermanet.train.throughput import EpochThroughput

log = logging.getLogger(__name__)
METRICS_CSV = "metrics.csv"


def monitor_mode(metric: str) -> str:
    """ "min" for losses, "max" for every other metric (accuracy, AUROC, F1)."""
    return "min" if "loss" in metric.rsplit("/", 1)[-1] else "max"


def experiment_dir(storage_path: str, name: str) -> str:
    """`<storage>/<name>`: Ray's run folder (the resume key), where exports and logs also go."""
    storage = (
        storage_path if is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
    )
    return join(storage, name)


def local_log_dir(output: str, log_dir: str | None = None) -> Path:
    """Where per-epoch CSV/PNG logs go: `log_dir`, else `<output>/logs` (a temp folder for URIs)."""
    if log_dir:
        return Path(log_dir).expanduser().resolve()
    base = output if not is_uri(output) else tempfile.mkdtemp(prefix="dermanet-logs-")
    return Path(base) / "logs"


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """float16 autocast needs a GPU; on CPU bf16 is the mixed precision that works."""
    if not use_gpu and precision == "16-mixed":
        log.warning("16-mixed needs a GPU; using bf16-mixed on CPU")
        return "bf16-mixed"
    return precision


def relative_location(location: str | None) -> str | None:
    """A data location as provenance: URIs as they are, local paths as their last two parts.

    Shipped checkpoints must not carry the training machine's absolute paths.
    """
    if location is None or is_uri(location):
        return location
    return "/".join(Path(location).parts[-2:])


@dataclass
class JobData:
    """What a variant's data step hands the template: raw sources and their facts."""

    sources: dict[str, ray.data.Dataset]  # "train" (required), "val" (optional): undecoded rows
    train_images: int
    description: str
    worker_config: dict[str, Any] = field(default_factory=dict)  # e.g. class weights
    repeats: dict[int, float] | None = None  # copies per row index of the training stream
    provenance: dict[str, Any] = field(default_factory=dict)  # facts of the data


class TrainingJob(ABC):
    """The outline of every Ray Train job; variants override the hooks marked below."""

    kind: ClassVar[str]  # provenance "job"
    settings_type: ClassVar[type[RunSettings]]
    train_mode: ClassVar[Mode] = "train"  # pipeline mode of the training stream
    curves: ClassVar[tuple[str, ...]] = ()
    curves_png: ClassVar[str] = "training_curves.png"
    seed_per_rank: ClassVar[bool] = True  # False: every rank builds identical weights

    def __init__(self, settings: RunSettings):
        self.settings = settings

    # -- hooks a variant supplies ------------------------------------------------------------
    @abstractmethod
    def load_data(self) -> JobData:
        """Raw (undecoded) Ray Data sources and the training-set size."""

    @abstractmethod
    def build_module(self, config: dict[str, Any]) -> pl.LightningModule:
        """The LightningModule, built on each worker from the driver's config."""

    @abstractmethod
    def export(
        self, module: pl.LightningModule, folder: Path, metrics: dict[str, float],
        provenance: dict[str, Any],
    ) -> None:  # fmt: skip
        """Write the job's artefact into a checkpoint folder (rank 0, every epoch)."""

    @abstractmethod
    def finish(self, result: ray.train.Result, output: str, log_dir: Path) -> Any:
        """Copy the artefacts out of Ray's checkpoint folders; the job's outcome."""

    def optimizer_steps_per_epoch(self, batches_per_epoch: int) -> int:
        return batches_per_epoch

    def worker_callbacks(self, config: dict[str, Any]) -> list[pl.Callback]:
        """Extra per-worker callbacks (after the shared ones)."""
        return []

    def trainer_options(self) -> dict[str, Any]:
        """Extra Lightning Trainer arguments (e.g. gradient accumulation)."""
        return {}

    def checkpoint_config(self) -> CheckpointConfig:
        return CheckpointConfig(num_to_keep=2)

    def provenance(self) -> dict[str, Any]:
        """What the variant adds to every artefact's provenance."""
        return {}

    def required_metrics(self) -> tuple[str, ...]:
        """Metrics every report carries (NaN on epochs that did not measure them)."""
        return ()

    # -- the driver ---------------------------------------------------------------------------
    def run(self, run_callbacks: list[Any] | None = None, tracked: bool = True) -> Any:
        """Validate, build the data and the TorchTrainer, train, export.

        `run_callbacks` go to Ray's RunConfig (Ray Tune passes its TuneReportCallback there).
        `tracked`: an MLflow run when MLFLOW_TRACKING_URI is set (a Tune trial has its run
        from the Tuner's callback instead).
        """
        s = self.settings
        s.validate()
        s = self.settings = dataclasses.replace(
            s.with_absolute_paths(), precision=resolve_precision(s.precision, s.use_gpu)
        )
        data = self.load_data()
        pipeline = PipelineConfig(
            img_size=s.img_size,
            num_cpus=s.data_cpus / 2,
            color_constancy=getattr(s, "color_constancy", "none"),
            camera_p=getattr(s, "camera_augment", 0.0),
        )
        datasets = {
            split: build_pipeline(
                source,
                self.train_mode if split == "train" else "eval",
                pipeline,
                seed=s.seed,
                repeats=data.repeats if split == "train" else None,
            )
            for split, source in data.sources.items()
        }
        batches_per_epoch = data.train_images // (s.batch_size * s.num_workers)
        if batches_per_epoch < 1:
            raise ValueError(
                f"{data.train_images} images give no full batch of {s.batch_size} on each of "
                f"{s.num_workers} workers; lower --batch-size or --num-workers"
            )
        steps_per_epoch = max(1, self.optimizer_steps_per_epoch(batches_per_epoch))
        output = experiment_dir(s.storage_path, s.name)
        log_dir = local_log_dir(output, getattr(s, "log_dir", None))
        config = {
            **data.worker_config,
            "settings": {**plain_settings(s), "extra_callbacks": s.extra_callbacks},
            "model_config": self.model_config(),
            "warmup_steps": int(s.warmup_epochs * steps_per_epoch),
            "total_steps": steps_per_epoch * s.epochs,
            "batches_per_epoch": batches_per_epoch,
            "log_dir": str(log_dir),
            "console_bar": sys.stderr.isatty(),
            "splits": sorted(datasets),
            "provenance": {
                "job": self.kind,
                "experiment": s.name,
                "data": data.description,
                **data.provenance,
                **self.provenance(),
                "settings": {
                    k: relative_location(v) if k in ("shards", "csv", "images") else v
                    for k, v in plain_settings(s).items()
                },
            },
        }
        tracking = JobRun(self.kind, s, output, enabled=tracked)
        config["tracking"] = tracking.worker_config()
        log.info(
            "%s: %d images, %d optimiser steps/epoch (%d workers x batch %d), %d epochs; "
            "run folder %s",
            self.kind, data.train_images, steps_per_epoch, s.num_workers, s.batch_size,
            s.epochs, output,
        )  # fmt: skip
        resources: dict[str, float] = {"CPU": s.cpus_per_worker}
        if s.use_gpu:
            resources["GPU"] = 1
        trainer = TorchTrainer(
            functools.partial(_worker_entry, type(self)),
            train_loop_config=config,
            scaling_config=ScalingConfig(
                num_workers=s.num_workers,
                use_gpu=s.use_gpu,
                resources_per_worker=resources,
                placement_strategy=s.placement_strategy,
            ),
            run_config=RunConfig(
                name=s.name,
                storage_path=str(Path(output).parent) if not is_uri(output) else s.storage_path,
                checkpoint_config=self.checkpoint_config(),
                failure_config=FailureConfig(max_failures=s.max_failures),
                callbacks=run_callbacks or [],
                # Ray Train's INFO lines (resources, checkpoints, reports) go to Ray's session
                # logs; the console keeps warnings and our one line per epoch.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split="all"),
        )
        with tracking:
            result = trainer.fit()
            outcome = self.finish(result, output, log_dir)
            plot_history(log_dir, list(self.curves), self.curves_png)
            tracking.finish(log_dir, outcome)
        return outcome

    def model_config(self) -> dict[str, Any]:
        from dermanet.models import ModelConfig

        return ModelConfig.from_yaml(self.settings.model_config).to_dict()

    # -- every worker -------------------------------------------------------------------------
    def worker(self, config: dict[str, Any]) -> None:
        """The per-worker loop: module, callbacks, Trainer, batches, fit (resuming if possible)."""
        s = self.settings
        rank = ray.train.get_context().get_world_rank()
        log_dir = Path(config["log_dir"])
        log_dir.mkdir(parents=True, exist_ok=True)
        quiet_worker_logs(log_dir / f"worker_{rank}.log")
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        pl.seed_everything(
            s.seed + (rank if self.seed_per_rank else 0), workers=True, verbose=False
        )
        module = self.build_module(config)
        callbacks: list[pl.Callback] = [
            EpochThroughput(),  # before the reporter, which reads what it logs
            RayTrainReporter(
                export_fn=functools.partial(self.export, provenance=config["provenance"]),
                metrics_csv=str(log_dir / METRICS_CSV),
                confusion_png_dir=str(log_dir / "confusion_matrix"),
                required_metrics=self.required_metrics(),
                epoch_log=epoch_log(config.get("tracking")),
            ),
            GradientMonitor(
                log_dir / "nan_dumps",
                on_nan=s.on_nan,
                log_every_n_steps=10,
                histogram_every_n_steps=getattr(s, "histogram_every_n_steps", 0),
            ),
            *self.worker_callbacks(config),
            ConsoleProgress(config["batches_per_epoch"], s.epochs, bar=config["console_bar"]),
            *s.extra_callbacks,
        ]
        trainer = prepare_trainer(
            pl.Trainer(
                max_epochs=s.epochs,
                accelerator="gpu" if s.use_gpu else "cpu",
                devices="auto",
                strategy=RayDDPStrategy(find_unused_parameters=False),
                plugins=[RayLightningEnvironment()],
                precision=s.precision,
                gradient_clip_val=s.grad_clip or None,
                callbacks=callbacks,
                logger=TensorBoardLogger(log_dir, name="tensorboard", version=""),
                enable_checkpointing=False,  # Ray owns the checkpoint folders (the reporter)
                enable_progress_bar=False,  # ConsoleProgress draws one bar, on rank 0
                enable_model_summary=False,
                num_sanity_val_steps=0,
                log_every_n_steps=10,
                use_distributed_sampler=False,  # Ray Data already shards the data
                **self.trainer_options(),
            )
        )
        loaders = {"train_dataloaders": self._batches("train", shuffle=True)}
        if "val" in config["splits"]:
            loaders["val_dataloaders"] = self._batches("val", shuffle=False)
        trainer.fit(module, **loaders, ckpt_path=resume_checkpoint_path())

    def _batches(self, split: str, shuffle: bool) -> NormalizedBatches:
        s = self.settings
        options: dict[str, Any] = {"batch_size": s.batch_size, "device": "auto"}
        if shuffle:
            options |= {
                "drop_last": True,  # BatchNorm fails on a last batch of 1
                "local_shuffle_buffer_size": s.batch_size * 8,
                "local_shuffle_seed": s.seed,
            }
        return NormalizedBatches(ray.train.get_dataset_shard(split).iter_torch_batches(**options))


def _worker_entry(job_type: type[TrainingJob], config: dict[str, Any]) -> None:
    """Ray Train's train_func: rebuild the job from plain settings on the worker and run it."""
    settings = job_type.settings_type(**config["settings"])
    job_type(settings).worker(config)


def resume_checkpoint_path() -> str | None:
    """The Lightning state of Ray's latest checkpoint (a rerun or a retried worker group)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="dermanet-resume-"))
    checkpoint.to_directory(str(local))
    return str(local / LIGHTNING_CKPT)


def latest_checkpoint(result: ray.train.Result, output: str) -> ray.train.Checkpoint:
    """The run's latest checkpoint, or the run's own error / a clear one when there is none."""
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint; see the logs in {output}")
    return result.checkpoint


def epochs_completed(result: ray.train.Result, log_dir: Path) -> int:
    """Epochs done so far, from Ray's last metrics and the kept metrics.csv (after resumes)."""
    epochs = int((result.metrics or {}).get("epoch", -1)) + 1
    csv = log_dir / METRICS_CSV
    if csv.is_file():
        epochs = max(epochs, int(pd.read_csv(csv)["epoch"].max()) + 1)
    return epochs


def finite_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }


def plot_history(log_dir: Path, columns: list[str], filename: str) -> Path | None:
    """Plot metrics.csv columns against epoch into `log_dir/filename` (local log folders only)."""
    from dermanet.eval.plots import save_figure, training_curves_figure

    csv = log_dir / METRICS_CSV
    if not csv.is_file() or not columns:
        return None
    history = pd.read_csv(csv)
    return save_figure(training_curves_figure(history, columns), log_dir / filename)


def early_stopping(settings: Any) -> list[pl.Callback]:
    """EarlyStopping on `--monitor` in the metric's own direction, when a patience is set."""
    patience = getattr(settings, "early_stopping_patience", 0)
    if patience <= 0:
        return []
    return [EarlyStopping(settings.monitor, mode=monitor_mode(settings.monitor), patience=patience)]
