"""Shared optimisation utilities and the GradientMonitor's NaN handling in real Lightning runs."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from dermanet.models import create_model
from dermanet.train import (
    LARS,
    BYOLModule,
    GradientMonitor,
    NonFiniteTrainingError,
    build_optimizer,
    param_groups,
    warmup_cosine_schedule,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "dermanet_tiny.yaml"


def trainer(tmp_path: Path, monitor: GradientMonitor, **kwargs) -> pl.Trainer:
    defaults = {"logger": False, "max_steps": 4}
    return pl.Trainer(
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        default_root_dir=tmp_path,
        **{**defaults, **kwargs},
    )


def all_finite(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# -- param_groups / optimisers / schedule ---------------------------------------------------
def test_param_groups_exclude_gem_norms_and_biases_from_decay() -> None:
    model = create_model(TINY)
    model.stem[0].weight.requires_grad_(False)  # frozen parameters belong to no group
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.05)}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    decay = {id(p) for p in groups["decay"]["params"]}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}

    expected_no_decay = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            norm = isinstance(module, (nn.BatchNorm2d, nn.LayerNorm))
            if p.requires_grad and (norm or name in ("bias", "raw_p")):
                expected_no_decay.add(id(p))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert no_decay == expected_no_decay
    assert not decay & no_decay and decay | no_decay == trainable
    assert len(groups["decay"]["params"]) + len(groups["no_decay"]["params"]) == len(trainable)
    assert id(model.pool.raw_p) in no_decay
    assert id(model.head[0].weight) in no_decay  # LayerNorm
    assert id(model.stages[0][0].se.reduce.bias) in no_decay  # conv bias
    assert id(model.head[2].weight) in decay and id(model.stages[0][0].conv1.weight) in decay
    assert id(model.stem[0].weight) not in decay | no_decay


def test_build_optimizer_kinds() -> None:
    model = create_model(TINY)
    adamw = build_optimizer(model, "adamw", lr=0.01, weight_decay=0.1)
    assert isinstance(adamw, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 0.1]
    assert isinstance(build_optimizer(model, "lars", lr=0.1, weight_decay=1e-6), LARS)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, "sgdx")  # type: ignore[arg-type]


def test_lars_adapts_decayed_weights_and_leaves_no_decay_group_plain() -> None:
    layer = nn.Linear(4, 3)
    # weight_decay 0 still adapts the weight group (lightly's LARS would silently not).
    optimizer = build_optimizer(layer, "lars", lr=0.1, weight_decay=0.0, momentum=0.0)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.weight.grad = torch.full_like(layer.weight, 2.0)
    layer.bias.grad = torch.full_like(layer.bias, 2.0)
    optimizer.step()
    trust = 0.001 * w0.norm() / (layer.weight.grad.norm() + 1e-8)
    torch.testing.assert_close(layer.weight.detach(), w0 - 0.1 * trust * 2.0)
    torch.testing.assert_close(layer.bias.detach(), b0 - 0.1 * 2.0)  # plain SGD


def test_warmup_cosine_values() -> None:
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = warmup_cosine_schedule(
        optimizer, warmup_steps=10, total_steps=110, min_lr_ratio=0.1
    )
    lrs = []
    for _ in range(150):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.2)  # 1/10 of the base: the first step already learns
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(2.0) and lrs[10] == pytest.approx(2.0)
    assert lrs[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # cosine midpoint
    assert lrs[35] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lrs[110] == pytest.approx(0.2) and lrs[149] == pytest.approx(0.2)
    assert all(b <= a for a, b in itertools.pairwise(lrs[10:]))
    with pytest.raises(ValueError):
        warmup_cosine_schedule(optimizer, warmup_steps=20, total_steps=10)


# -- GradientMonitor ------------------------------------------------------------------------
class TinyClassifier(pl.LightningModule):
    """A minimal supervised module: the monitor must not assume BYOL."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = create_model(TINY)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.model(batch["image"]).logits, batch["label"])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, "adamw", lr=1e-3, weight_decay=0.01)


def classifier_samples(n: int, poisoned: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        image = torch.randn(3, 32, 32, generator=g)
        if i == poisoned:
            image[0, 5, 5] = float("nan")
        samples.append({"image": image, "label": torch.tensor(i % 8), "index": torch.tensor(i)})
    return samples


def test_monitor_stops_on_nan_with_a_dump(tmp_path: Path) -> None:
    module = TinyClassifier()
    monitor = GradientMonitor(tmp_path / "dumps", on_nan="stop")
    loader = DataLoader(classifier_samples(32, poisoned=9), batch_size=4, drop_last=True)
    run = trainer(tmp_path, monitor, max_steps=4, accumulate_grad_batches=2)
    with pytest.raises(NonFiniteTrainingError) as excinfo:
        run.fit(module, loader)

    # Micro-batches 2 (indices 8-11, poisoned) and 3 (12-15) form optimizer step 1.
    path = excinfo.value.dump_path
    assert path.parent == tmp_path / "dumps" and str(path) in str(excinfo.value)
    dump = json.loads(path.read_text())
    assert dump["action"] == "stop"
    assert dump["step"] == 1 and dump["epoch"] == 0 and dump["batch_idx"] == 3
    assert dump["batch_index"] == list(range(8, 16))
    assert "loss" in dump["reasons"] and "grad" in dump["reasons"]
    assert dump["losses"][0] == "nan" and isinstance(dump["losses"][1], float)
    assert dump["grad_norm"] == "nan" and isinstance(dump["weight_norm"], float)
    names = {n for n, _ in module.named_parameters()}
    assert dump["nonfinite_grads"] and {g["name"] for g in dump["nonfinite_grads"]} <= names
    assert "model.stem.0.weight" in {g["name"] for g in dump["nonfinite_grads"]}
    assert dump["nonfinite_weights"] == []
    assert run.should_stop and run.global_step == 1
    assert all_finite(module)  # the bad step was never applied; BN stats restored


def byol_samples(n: int, poisoned: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(n):
        view1, view2 = torch.randn(3, 32, 32, generator=g), torch.randn(3, 32, 32, generator=g)
        if i == poisoned:
            view1[1, 3, 3] = float("inf") * 0  # NaN
        samples.append({"view1": view1, "view2": view2, "index": torch.tensor(i)})
    return samples


def test_monitor_skip_continues_and_keeps_weights_finite(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = BYOLModule(
        model_config=str(TINY), proj_hidden_dim=64, proj_out_dim=32, pred_hidden_dim=64
    )
    monitor = GradientMonitor(tmp_path / "dumps", on_nan="skip", histogram_every_n_steps=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    loader = DataLoader(byol_samples(16, poisoned=5), batch_size=4, drop_last=True)
    run = trainer(tmp_path, monitor, max_steps=4, logger=logger, log_every_n_steps=1)
    run.fit(module, loader)

    assert run.global_step == 4 and monitor.skipped_steps == 1
    assert [p.name for p in monitor.dumps] == ["nonfinite-step0000001-rank0.json"]
    dump = json.loads(monitor.dumps[0].read_text())
    assert dump["action"] == "skip" and dump["batch_index"] == [4, 5, 6, 7]
    assert dump["loss"] == "nan"
    assert all_finite(module)  # online, target and BN running stats
    assert math.isfinite(float(run.callback_metrics["monitor/grad_norm"]))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "weights/byol.backbone.stem.0.weight" in tags["histograms"]
    assert "grads/byol.backbone.stem.0.weight" in tags["histograms"]
    assert "monitor/grad_norm" in tags["scalars"]
