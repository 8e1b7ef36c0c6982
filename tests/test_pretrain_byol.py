"""BYOL pretraining on Ray Train (2 CPU workers, synthetic images): CLI, export, resume."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import ray.cloudpickle
import torch
from conftest import load_job

from dermanet.inference.checkpoint import load_backbone_file
from dermanet.models import ModelConfig, create_model
from dermanet.train.pretrain import PretrainSettings, run_pretraining

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "dermanet_tiny.yaml")
cli = load_job("pretrain_byol")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # callbacks travel to workers


class RecordStart(pl.Callback):
    """Appends the epoch each fit starts at (rank 0), so a test can tell resume from restart."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{trainer.current_epoch}\n")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from dermanet.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("byol-data")
    generate_synthetic_dataset(root, num_images=96, size=48, seed=3)
    return root / "images"


def _settings(images: Path, storage: Path, **overrides) -> PretrainSettings:
    base = {
        "data_dirs": [str(images)],
        "model_config": TINY,
        "img_size": 48,
        "batch_size": 8,  # 96 images / (8 x 2 workers) = 6 optimiser steps per epoch
        "epochs": 2,
        "lr": 1e-3,
        "proj_hidden_dim": 256,
        "proj_out_dim": 64,
        "pred_hidden_dim": 256,
        "storage_path": str(storage),
        "name": "byol-synthetic",
        "num_workers": 2,
        "cpus_per_worker": 0.5,
    }
    return PretrainSettings(**{**base, **overrides})


def test_help_documents_every_flag(capsys) -> None:
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    undocumented = [a.option_strings[0] for a in flags if not (a.help or "").strip()]
    assert undocumented == []
    for action in flags:
        for option in action.option_strings:
            assert option in text, option
    # Every setting a user may change has a flag (tests' callback list excepted).
    settable = set(PretrainSettings.__dataclass_fields__) - {"extra_callbacks"}
    assert settable <= {a.dest for a in flags}
    # The original scripts/pretrain_byol.py spellings still parse.
    old = parser.parse_args(
        ["--data-dirs", "a", "b", "--model-cfg", "m.yaml", "--experiment-name", "x",
         "--gradient-clip-val", "0.5", "--workers", "3", "--accumulate-grad-batches", "4"]
    )  # fmt: skip
    assert (old.data_dirs, old.model_config, old.name) == (["a", "b"], "m.yaml", "x")
    assert (old.grad_clip, old.num_workers, old.accumulate_grad_batches) == (0.5, 3, 4)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--data-dirs", "/no/such/folder"], "is not a folder"),
        ([], "either --data-dirs"),
        (["--data-dirs", ".", "--shards", "/tmp/x"], "either --data-dirs"),
        (["--data-dirs", ".", "--model-config", "/no/model.yaml"], "--model-config"),
        (["--data-dirs", ".", "--warmup-epochs", "5", "--max-epochs", "2"], "--warmup-epochs"),
        (["--data-dirs", ".", "--batch-size", "1"], "--batch-size >= 2"),
        (["--data-dirs", ".", "--exclude-origins", "clinic_b"], "--exclude-origins needs --shards"),
    ],
)
def test_cli_rejects_bad_input_with_exit_2(argv: list[str], expected: str, capsys) -> None:
    assert cli.main(argv) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_pretraining_exports_a_loadable_backbone_and_resumes(
    ray_local, image_folder, tmp_path, capsys
) -> None:
    # First run through the CLI, as a user would.
    argv = ["--data-dirs", str(image_folder), "--model-config", TINY, "--img-size", "48",
            "--batch-size", "8", "--max-epochs", "2", "--lr", "1e-3", "--proj-hidden-dim", "256",
            "--proj-out-dim", "64", "--pred-hidden-dim", "256", "--storage-path", str(tmp_path),
            "--name", "byol-synthetic"]  # fmt: skip
    assert cli.main(argv) == 0
    backbone = tmp_path / "byol-synthetic" / "backbone.pt"
    assert f"backbone: {backbone}" in capsys.readouterr().out
    logs = tmp_path / "byol-synthetic" / "logs"
    first = pd.read_csv(logs / "metrics.csv")
    assert first["epoch"].tolist() == [0, 1]
    assert first["step"].tolist() == [6, 12]  # 96 images / (batch 8 x 2 workers) per epoch
    columns = ["train/loss_epoch", "train/embedding_std_epoch", "train/momentum", "train/lr",
               "perf/train_images_per_sec"]  # fmt: skip
    for column in columns:
        assert all(math.isfinite(v) for v in first[column]), column
    assert first["train/loss_epoch"].between(0, 8).all()  # the symmetric BYOL loss's range
    assert first["train/momentum"].iloc[1] > first["train/momentum"].iloc[0] >= 0.996
    assert (logs / "byol_curves.png").stat().st_size > 0

    # backbone.pt: the tiny config, every backbone key, no head, equal to the trained weights.
    config, state = load_backbone_file(backbone)
    assert config == ModelConfig.from_yaml(TINY)
    model = create_model(TINY)
    report = model.load_backbone(state)  # what jobs/train.py --pretrain-ckpt does
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert len(report.matched) == len(model.backbone_state_dict())
    newest = max(
        (tmp_path / "byol-synthetic").glob("checkpoint_*/checkpoint.ckpt"),
        key=lambda p: p.stat().st_mtime,
    )
    lightning_state = torch.load(newest, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in state.items():
        torch.testing.assert_close(value, lightning_state["byol.backbone." + key], msg=key)
    provenance = torch.load(backbone, weights_only=True)["provenance"]
    assert provenance["optimizer_steps"] == 12 and provenance["images"] == 96
    assert provenance["job"] == "pretrain_byol" and provenance["method"] == "byol"

    # Same name, more epochs: starts at epoch 2 from the checkpoint, epochs 0-1 kept as they were.
    starts = tmp_path / "starts.txt"
    resumed = run_pretraining(
        _settings(image_folder, tmp_path, epochs=3, extra_callbacks=[RecordStart(str(starts))])
    )
    assert starts.read_text().split() == ["2"]
    assert resumed.epochs_completed == 3 and resumed.backbone == str(backbone)
    history = pd.read_csv(resumed.metrics_csv)
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["step"].tolist() == [6, 12, 18]
    pd.testing.assert_frame_equal(history.iloc[:2][first.columns], first)
    assert torch.load(backbone, weights_only=True)["provenance"]["optimizer_steps"] == 18


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_pretraining_reads_only_the_kept_origins_of_shards(ray_local, tmp_path) -> None:
    """A leave-one-source-out study pretrains without the source it scores: the rows BYOL
    streams are those of the kept sources, of the splits asked for."""
    from dermanet.data import assign_splits, read_plain_csv
    from dermanet.data.shards import prepare_shards
    from dermanet.data.synthetic import generate_synthetic_dataset
    from dermanet.train.pretrain import load_images

    root = tmp_path / "data"
    generate_synthetic_dataset(root, num_images=60, size=32, seed=4)
    catalogue = assign_splits(read_plain_csv(root / "metadata.csv", root / "images"), seed=0)
    catalogue["origin"] = ["clinic_b" if i % 3 == 0 else "clinic_a" for i in range(60)]
    prepare_shards(catalogue, str(tmp_path / "shards"), short_side=32)
    settings = _settings(root, tmp_path, data_dirs=[], shards=str(tmp_path / "shards"),
                         exclude_origins=["clinic_b"])  # fmt: skip
    settings.validate()
    source, size, where = load_images(settings)
    kept = catalogue.loc[
        (catalogue["origin"] == "clinic_a") & catalogue["split"].isin(["train", "val"])
    ]
    assert size == len(kept) == len(source.take_all())
    assert "without clinic_b" in where
