"""The settings of the Ray Train jobs, each written once (default, help, flag and rule).

`RunSettings` holds what every training job shares (optimisation, run folder, workers);
`TrainSettings` (jobs/train.py) and `PretrainSettings` (jobs/pretrain_byol.py) add their own.
The jobs' flags are generated from these fields (`dermanet.settings.add_arguments`) and Ray
Tune's search space names them, so a new hyperparameter is one new field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from dermanet.data.catalogue import SPLITS
from dermanet.data.sources import DataSourceSettings
from dermanet.models import DEFAULT_CONFIG_PATH
from dermanet.settings import HIDDEN, check_settings, option
from dermanet.storage import is_uri

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
OPTIMIZERS = ("adamw", "lars")
ON_NAN = ("stop", "skip")
COLOR_CONSTANCY = ("none", "shades_of_gray")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RunSettings:
    """What every Ray Train job here accepts: model, optimisation, and where and how it runs."""

    model_config: str = option(
        str(DEFAULT_CONFIG_PATH),
        "DermResNetSE YAML (a BYOL backbone and its fine-tune must use the same one)",
        group="model",
        aliases=("--model-cfg",),
    )
    img_size: int = option(128, "input side in pixels", group="data", minimum=32)
    exclude_origins: list[str] = option(
        help="leave images of these origins out of training and validation (data with an "
        "`origin` column): a leave-one-source-out study scores them afterwards with "
        "jobs/evaluate.py --origins",
        group="data",
        metavar="ORIGIN",
        default_factory=list,
    )
    epochs: int = option(10, "training epochs in all", group="optimisation", minimum=1)
    batch_size: int = option(
        32,
        "images per worker per step (BatchNorm needs >= 2)",
        group="optimisation",
        minimum=2,
    )
    lr: float = option(1e-3, "peak learning rate", group="optimisation", minimum=0, exclusive=True)
    weight_decay: float = option(
        0.05, "weight decay (not on norms, biases, GeM p)", group="optimisation", minimum=0
    )
    optimizer: str = option("adamw", "AdamW or LARS", group="optimisation", choices=OPTIMIZERS)
    warmup_epochs: float = option(
        1.0, "linear LR warm-up (epochs), then cosine decay", group="optimisation", minimum=0
    )
    grad_clip: float = option(
        1.0,
        "gradient norm clip (0 disables)",
        group="optimisation",
        minimum=0,
        aliases=("--gradient-clip-val",),
    )
    precision: str = option(
        "32-true",
        "numeric precision (16-mixed becomes bf16-mixed on CPU)",
        group="optimisation",
        choices=PRECISIONS,
    )
    seed: int = option(0, "random seed", group="optimisation")
    on_nan: str = option(
        "stop",
        "on a non-finite step: stop the run, or skip the step (a JSON dump either way)",
        group="optimisation",
        choices=ON_NAN,
    )
    storage_path: str = option(
        "outputs", "folder or URI for checkpoints, exports and logs", group="run"
    )
    name: str = option(
        "dermanet-train",
        "experiment name: re-running with the same name and storage path resumes",
        group="run",
        aliases=("--experiment-name",),
    )
    num_workers: int = option(
        2,
        "Ray Train workers (one process and data shard each)",
        group="run",
        minimum=1,
        aliases=("--workers",),
    )
    use_gpu: bool = option(False, "one GPU per worker", group="run")
    cpus_per_worker: float = option(
        0.5, "CPUs reserved per training worker", group="run", minimum=0, exclusive=True
    )
    torch_threads: int = option(
        0,
        "torch threads per training worker (0: the machine's cores / workers)",
        group="run",
        minimum=0,
    )
    data_cpus: float = option(
        1.0,
        "CPUs for Ray Data decode+augment (two tasks of half each)",
        group="run",
        minimum=0,
        exclusive=True,
    )
    max_failures: int = option(
        1, "worker-group retries (each resumes from the last checkpoint)", group="run", minimum=0
    )
    placement_strategy: str = option(
        "PACK",
        "where Ray places the training workers: PACK fills few nodes, SPREAD puts them on "
        "different nodes while they fit (and on fewer after a node is lost); STRICT_PACK and "
        "STRICT_SPREAD wait until exactly that placement fits",
        group="run",
        choices=PLACEMENT_STRATEGIES,
    )
    extra_callbacks: list[Any] = field(
        default_factory=list, metadata={"group": HIDDEN}
    )  # tests inject faults with this

    def path_fields(self) -> tuple[str, ...]:
        """The settings naming local files the workers open themselves: Ray Train workers and
        Tune trials run in other working folders, so the driver makes these absolute first."""
        return ("model_config",)

    def with_absolute_paths(self) -> Self:
        """A copy whose local path settings are absolute (URIs and unset ones unchanged)."""
        values = {
            name: str(Path(value).expanduser().resolve())
            for name in self.path_fields()
            if (value := getattr(self, name)) is not None and not is_uri(value)
        }
        return dataclasses.replace(self, **values)

    def validate(self) -> None:
        """Every field's own rule, then the rules between fields; errors name the flags."""
        check_settings(self)
        if not is_uri(self.model_config) and not Path(self.model_config).is_file():
            raise FileNotFoundError(f"--model-config: {self.model_config} does not exist")
        if self.warmup_epochs > self.epochs:
            raise ValueError(
                f"invalid settings, need: 0 <= --warmup-epochs <= --epochs "
                f"(got {self.warmup_epochs} > {self.epochs})"
            )


@dataclass
class TrainSettings(RunSettings, DataSourceSettings):
    """jobs/train.py: supervised fine-tuning. Data: `shards`, or `csv` + `images`."""

    pretrain_ckpt: str | None = option(
        None, "BYOL backbone.pt to start from (reports matched/missing keys)", group="model"
    )
    init_checkpoint: str | None = option(
        None,
        "whole classifier checkpoint (e.g. best.pt) to warm-start every weight from, head "
        "included, with a fresh optimiser and schedule: progressive resizing (train at a "
        "higher --img-size from a lower-resolution model). Same --model-config and "
        "--color-constancy as that checkpoint. Not a resume: re-run --name for that",
        group="model",
    )
    dropout: float | None = option(
        None, "override the model config's head dropout", group="model", minimum=0, maximum=1
    )
    label_smoothing: float = option(
        0.0, "cross-entropy label smoothing", group="optimisation", minimum=0, maximum=1
    )
    aux_loss_weight: float = option(
        0.0, "benign-vs-malignant auxiliary loss weight (0 off)", group="optimisation", minimum=0
    )
    early_stopping_patience: int = option(
        0, "epochs without gain in --monitor before stopping (0 off)", group="optimisation",
        minimum=0,
    )  # fmt: skip
    monitor: str = option(
        "val/balanced_accuracy",
        "validation metric that picks best.pt and early stopping (losses are minimised, "
        "everything else maximised)",
        group="optimisation",
    )
    val_every: int = option(
        1, "validate every N epochs (and always after the last)", group="optimisation", minimum=1
    )
    class_weight_power: float = option(
        1.0,
        "loss weight of class c = (N / (K n_c)) ** power: 1 inverse frequency, 0 unweighted",
        group="recipe",
        minimum=0,
    )
    sampling_power: float = option(
        0.0,
        "class-rebalanced sampling: class c drawn with share ∝ n_c ** (1 - power); 0 natural, "
        "1 balanced (pair it with --class-weight-power 0)",
        group="recipe",
        minimum=0,
        maximum=1,
    )
    origin_sampling_power: float = option(
        0.0,
        "source-rebalanced sampling: inside each class, an image of origin o is drawn with "
        "weight ∝ n_o ** -power (n_o: that origin's training images), so rare sources weigh "
        "more without changing class shares; 0 off, 1 sources equal where classes allow "
        "(a source 100x smaller is then repeated ~100x: keep it low for tiny sources). "
        "Needs an `origin` column",
        group="recipe",
        minimum=0,
        maximum=1,
    )
    mixup_alpha: float = option(0.0, "Mixup Beta(alpha, alpha) (0 off)", group="recipe", minimum=0)
    cutmix_alpha: float = option(
        0.0, "CutMix Beta(alpha, alpha) (0 off; with Mixup, each batch draws one)",
        group="recipe", minimum=0,
    )  # fmt: skip
    mix_prob: float = option(
        1.0, "share of batches that Mixup/CutMix mixes", group="recipe", minimum=0, maximum=1
    )
    ema_decay: float = option(
        0.0,
        "exponential moving average of the weights (e.g. 0.999; 0 off): validated and shipped",
        group="recipe",
        minimum=0,
        maximum=1,
        exclusive=False,
    )
    color_constancy: str = option(
        "none",
        "Shades-of-Gray colour constancy before the model, in training and at inference "
        "(stored in the checkpoint)",
        group="recipe",
        choices=COLOR_CONSTANCY,
    )
    camera_augment: float = option(
        0.0,
        "probability of each camera/pipeline augmentation group (down-sampling, JPEG, colour "
        "cast, blur/noise); 0 off",
        group="recipe",
        minimum=0,
        maximum=1,
    )
    channels_last: bool = option(
        False, "channels-last memory format (faster convolutions on many CPUs/GPUs)", group="run"
    )

    def preprocessing(self) -> dict[str, Any]:
        """What inference must repeat, stored in every exported checkpoint."""
        return {"color_constancy": self.color_constancy}

    def path_fields(self) -> tuple[str, ...]:
        return ("model_config", "shards", "csv", "images", "pretrain_ckpt", "init_checkpoint")

    def validate(self) -> None:
        super().validate()
        if self.ema_decay >= 1:
            raise ValueError("invalid settings, need: 0 <= --ema-decay < 1")
        self.check_source()
        if self.init_checkpoint and self.pretrain_ckpt:
            raise ValueError(
                "give --init-checkpoint (a whole classifier) or --pretrain-ckpt (a BYOL "
                "backbone), not both"
            )


@dataclass
class PretrainSettings(RunSettings):
    """jobs/pretrain_byol.py: BYOL on unlabelled images. Data: `data_dirs`, or `shards`."""

    batch_size: int = option(
        64, "images per worker per step (BatchNorm needs >= 2)", group="optimisation", minimum=2
    )
    lr: float = option(3e-4, "peak learning rate", group="optimisation", minimum=0, exclusive=True)
    weight_decay: float = option(
        1e-4, "weight decay (not on norms, biases, GeM p)", group="optimisation", minimum=0
    )
    epochs: int = option(
        100, "training epochs in all", group="optimisation", minimum=1, aliases=("--max-epochs",)
    )
    seed: int = option(42, "random seed", group="optimisation")
    name: str = option(
        "dermanet-byol",
        "experiment name: re-running with the same name and storage path resumes",
        group="run",
        aliases=("--experiment-name",),
    )
    data_dirs: list[str] = option(
        help="one or more image folders (searched recursively for .jpg/.jpeg/.png)",
        group="data (give --data-dirs or --shards)",
        metavar="DIR",
        default_factory=list,
    )
    shards: str | None = option(
        None,
        "prepared shards (jobs/prepare_data.py output; labels are ignored)",
        group="data (give --data-dirs or --shards)",
    )
    shard_splits: list[str] = option(
        help="shard splits to pretrain on; the test split stays unseen unless you add it",
        group="data (give --data-dirs or --shards)",
        choices=SPLITS,
        default_factory=lambda: ["train", "val"],
    )
    proj_hidden_dim: int = option(4096, "projector hidden size", group="model", minimum=1)
    proj_out_dim: int = option(256, "projection (embedding) size", group="model", minimum=1)
    pred_hidden_dim: int = option(4096, "predictor hidden size", group="model", minimum=1)
    sync_batchnorm: bool = option(False, "BatchNorm statistics over all workers", group="model")
    base_momentum: float = option(
        0.996,
        "target EMA momentum at step 0 (cosine to 1 at the end)",
        group="optimisation",
        minimum=0,
        maximum=1,
    )
    accumulate_grad_batches: int = option(
        1,
        "batches per optimiser step (the EMA target moves once per step)",
        group="optimisation",
        minimum=1,
    )
    histogram_every_n_steps: int = option(
        0, "TensorBoard weight/gradient histograms every N steps (0 off)", group="run", minimum=0
    )
    log_dir: str | None = option(
        None,
        "folder for metrics.csv, curves, TensorBoard, NaN dumps (None: <storage-path>/<name>/logs)",
        group="run",
    )

    def path_fields(self) -> tuple[str, ...]:
        return ("model_config", "shards")

    def validate(self) -> None:
        super().validate()
        if bool(self.data_dirs) == bool(self.shards):
            raise ValueError("give either --data-dirs (image folders) or --shards, not both/none")
        if not self.shard_splits:
            raise ValueError(f"--shard-splits takes some of {SPLITS}")
        if self.exclude_origins and not self.shards:
            raise ValueError("--exclude-origins needs --shards (image folders have no origin)")
        for folder in self.data_dirs:
            if not is_uri(folder) and not Path(folder).expanduser().is_dir():
                raise FileNotFoundError(f"--data-dirs: {folder} is not a folder")
