"""BYOL: momentum schedule, exact EMA, loss, collapse metric, Lightning fit and backbone export."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from dermanet.inference.checkpoint import load_backbone_file, save_backbone
from dermanet.models import (
    BYOL,
    ModelConfig,
    byol_loss,
    cosine_momentum,
    create_model,
    embedding_std,
)
from dermanet.train import BYOLModule

TINY = Path(__file__).resolve().parents[1] / "configs" / "dermanet_tiny.yaml"
HEADS = {"proj_hidden_dim": 64, "proj_out_dim": 32, "pred_hidden_dim": 64}


def tiny_byol(**kwargs) -> BYOL:
    torch.manual_seed(0)
    return BYOL(create_model(TINY), **{**HEADS, **kwargs})


def two_view_batches(n: int, size: int = 32) -> list[dict[str, torch.Tensor]]:
    """Samples in the Ray Data two-view contract: view1, view2 float32 and an int64 index."""
    g = torch.Generator().manual_seed(1)
    return [
        {
            "view1": torch.randn(3, size, size, generator=g),
            "view2": torch.randn(3, size, size, generator=g),
            "index": torch.tensor(i, dtype=torch.int64),
        }
        for i in range(n)
    ]


# -- momentum schedule ---------------------------------------------------------------------
def test_cosine_momentum_schedule() -> None:
    total = 101
    values = [cosine_momentum(s, total) for s in range(total)]
    assert values[0] == pytest.approx(0.996, abs=1e-12)
    assert values[-1] == pytest.approx(1.0, abs=1e-12)
    assert values[50] == pytest.approx(0.998, abs=1e-12)  # midpoint of the half cosine
    assert values[25] == pytest.approx(1.0 - 0.004 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-12)
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert cosine_momentum(500, total) == 1.0  # flat after the end
    assert cosine_momentum(0, 10, base_momentum=0.99, final=0.999) == pytest.approx(0.99)
    with pytest.raises(ValueError):
        cosine_momentum(0, 0)


# -- loss -----------------------------------------------------------------------------------
def test_byol_loss_values() -> None:
    x = torch.randn(8, 16)
    assert byol_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    assert byol_loss(x, -x).item() == pytest.approx(4.0, abs=1e-6)
    e0, e1 = torch.eye(2)[:1], torch.eye(2)[1:]
    assert byol_loss(e0, e1).item() == pytest.approx(2.0, abs=1e-6)  # orthogonal
    with pytest.raises(ValueError):
        byol_loss(x, x[:, :8])


def test_forward_loss_is_symmetric_and_zero_for_identical_views() -> None:
    model = tiny_byol()
    a, b = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    out_ab, out_ba = model(a, b), model(b, a)
    torch.testing.assert_close(out_ab.loss, out_ba.loss)
    assert out_ab.loss.item() > 0.01
    assert out_ab.z1.shape == (6, 32) and out_ab.features1.shape == (6, 128)

    # With an identity predictor the online prediction equals the (freshly copied) target
    # projection, so identical views give zero loss: the target really is the online copy.
    model.predictor = nn.Identity()
    model.eval()
    assert model(a, a).loss.item() == pytest.approx(0.0, abs=1e-5)
    assert model(a, b).loss.item() > 0.01


# -- target network -------------------------------------------------------------------------
def test_update_target_is_exact_ema_and_target_gets_no_grad() -> None:
    model = tiny_byol()
    with torch.no_grad():  # make the target differ from the online net, so the mix is visible
        for p in [*model.target_backbone.parameters(), *model.target_projector.parameters()]:
            p.add_(torch.randn_like(p))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    out.loss.backward()
    target_params = [*model.target_backbone.parameters(), *model.target_projector.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in target_params)
    assert all(p.grad is None for p in model.backbone.head.parameters())  # frozen, unused
    assert model.backbone.stem[0].weight.grad is not None
    optimizer.step()

    m = 0.9
    old_target = [p.detach().clone() for p in target_params]
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    model.update_target(m)
    for new, old, cur in zip(target_params, old_target, online, strict=True):
        torch.testing.assert_close(new, m * old + (1 - m) * cur.detach(), rtol=0, atol=1e-6)
    online_bufs = dict(model.backbone.named_buffers())
    for name, buf in model.target_backbone.named_buffers():
        assert torch.equal(buf, online_bufs[name]), name  # BN running stats copied
    with pytest.raises(ValueError):
        model.update_target(1.5)


def test_embedding_std_detects_collapse() -> None:
    healthy = embedding_std(torch.randn(4096, 64))
    assert healthy.item() == pytest.approx(1 / math.sqrt(64), rel=0.05)
    collapsed = torch.ones(256, 64) + 1e-6 * torch.randn(256, 64)
    assert embedding_std(collapsed).item() < 1e-4


def test_sync_batchnorm_flag_converts_and_keeps_keys() -> None:
    model = tiny_byol(sync_batchnorm=True)
    kinds = {type(m) for m in model.modules()}
    assert nn.SyncBatchNorm in kinds
    assert not kinds & {nn.BatchNorm1d, nn.BatchNorm2d}
    model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))  # no process group: plain BN
    assert set(model.export_backbone()) == set(create_model(TINY).backbone_state_dict())


# -- backbone file --------------------------------------------------------------------------
def save_online_backbone(model: BYOL, path: Path, provenance: dict | None = None) -> Path:
    return save_backbone(path, model.model_config, model.export_backbone(), provenance)


def test_backbone_file_errors(tmp_path: Path) -> None:
    model = tiny_byol()
    with pytest.raises(TypeError, match="provenance"):
        save_online_backbone(model, tmp_path / "b.pt", provenance={"when": object()})
    with pytest.raises(ValueError, match="head"):
        save_backbone(tmp_path / "b.pt", ModelConfig(), create_model(TINY).state_dict())
    with pytest.raises(FileNotFoundError):
        load_backbone_file(tmp_path / "absent.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DermaNet backbone file"):
        load_backbone_file(tmp_path / "other.pt")
    path = save_online_backbone(model, tmp_path / "b.pt")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="format 99"):
        load_backbone_file(tmp_path / "future.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights_only"):
        load_backbone_file(tmp_path / "junk.pt")


# -- Lightning ------------------------------------------------------------------------------
def test_lightning_fit_updates_target_per_optimizer_step_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = BYOLModule(model_config=str(TINY), lr=1e-3, warmup_steps=1, **HEADS)
    assert module.hparams.model_config == ModelConfig.from_yaml(TINY).to_dict()
    momenta: list[float] = []
    update = module.byol.update_target  # spy: records the momentum, then runs the real update

    def recording_update(momentum: float) -> None:
        momenta.append(momentum)
        update(momentum)

    module.byol.update_target = recording_update  # type: ignore[method-assign]
    initial_target = module.byol.target_backbone.stem[0].weight.detach().clone()

    loader = DataLoader(two_view_batches(16), batch_size=4, shuffle=False, drop_last=True)
    trainer = pl.Trainer(
        max_steps=2,
        accumulate_grad_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    # 4 micro-batches, 2 optimizer steps: the EMA ran twice, on the schedule over 2 steps.
    assert trainer.global_step == 2
    assert module.total_steps == 2
    assert momenta == [pytest.approx(0.996), pytest.approx(1.0)]
    assert not torch.equal(module.byol.target_backbone.stem[0].weight, initial_target)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/embedding_std", "train/momentum", "train/lr"):
        assert key in metrics and math.isfinite(float(metrics[key])), key

    exported = module.byol.export_backbone()
    fresh = create_model(str(TINY))
    report = fresh.load_backbone(exported)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert len(report.matched) == len(fresh.backbone_state_dict())
    torch.testing.assert_close(fresh.pool.raw_p.detach(), exported["pool.raw_p"])

    path = module.save_backbone(tmp_path / "out" / "backbone.pt", provenance={"run": "test"})
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == "backbone" and raw["format_version"] == 2
    assert {k: raw["provenance"][k] for k in ("method", "optimizer_steps", "run")} == {
        "method": "byol",
        "optimizer_steps": 2,
        "run": "test",
    }
    config, state = load_backbone_file(path)
    assert config == fresh.config
    assert set(state) == set(exported)
    for key, value in exported.items():
        assert torch.equal(state[key], value), key
