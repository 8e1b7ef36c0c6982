"""DermResNetSE: shapes, GeM, SE switch, YAML config, backbone export."""

from __future__ import annotations

import pytest
import torch

from dermanet.classes import NUM_CLASSES
from dermanet.models import (
    DEFAULT_CONFIG_PATH,
    DermNetOutput,
    ModelConfig,
    count_parameters,
    create_model,
)
from dermanet.models.layers import GeM, SqueezeExcite

TINY = ModelConfig(layers=(1, 1, 1, 1), widths=(8, 16, 24, 32), stem_width=8)


@pytest.mark.parametrize(
    ("config", "size"),
    [
        (TINY, 64),
        (ModelConfig(layers=(1, 2), widths=(16, 40), stem_width=8, act="relu", num_classes=3), 96),
        (ModelConfig(layers=(2, 1, 1), widths=(8, 16, 48), act="gelu", se_ratio=0.0), 80),
    ],
)
def test_output_shapes(config: ModelConfig, size: int) -> None:
    model = create_model(config).eval()
    out = model(torch.randn(2, 3, size, size))
    assert isinstance(out, DermNetOutput)
    stride = 4 * 2 ** (len(config.layers) - 1)
    side = -(-size // stride)
    assert out.feature_map.shape == (2, config.widths[-1], side, side)
    assert out.features.shape == (2, config.widths[-1])
    assert out.logits.shape == (2, config.num_classes)
    assert out.malignancy_logit is None


def test_aux_malignancy_head() -> None:
    model = create_model(ModelConfig(**{**TINY.to_dict(), "aux_malignancy_head": True}))
    out = model(torch.randn(3, 3, 64, 64))
    assert out.malignancy_logit is not None and out.malignancy_logit.shape == (3,)


def test_default_config_from_yaml_and_parameter_count() -> None:
    config = ModelConfig.from_yaml(DEFAULT_CONFIG_PATH)
    assert config.layers == (2, 2, 2, 2)
    assert config.widths == (64, 128, 256, 512)
    assert (config.act, config.se_ratio, config.num_classes) == ("silu", 0.25, NUM_CLASSES)
    model = create_model()
    assert model.config == config
    params = count_parameters(model)
    print(f"\nDermResNetSE default config: {params:,} trainable parameters")
    # ResNet-18 body (11.2M) + SE (~0.17M) + LayerNorm/Linear head.
    assert 11_000_000 < params < 12_000_000


def test_gem_p_stays_positive_and_pools_in_float32_under_autocast() -> None:
    gem = GeM(p=3.0)
    assert gem.p.item() == pytest.approx(3.0, rel=1e-5)
    with torch.no_grad():
        gem.raw_p.fill_(-50.0)  # an optimiser pushing p towards zero or below
    assert gem.p.item() > 0
    gem = GeM(p=3.0)
    x = torch.rand(2, 4, 5, 5) * 40 + 1  # x^3 up to ~70k: overflows float16 (max 65504)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = gem(x.to(torch.bfloat16))
    assert pooled.dtype == torch.float32
    expected = x.to(torch.bfloat16).float().pow(3).mean((2, 3)).pow(1 / 3)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-5)


def test_model_under_autocast_and_channels_last() -> None:
    model = create_model(TINY).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.features.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    reference = create_model(TINY).eval()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        model(x).logits, reference(x.contiguous()).logits, rtol=1e-4, atol=1e-4
    )


def test_se_disabled_when_ratio_zero() -> None:
    with_se = create_model(TINY)
    without = create_model(ModelConfig(**{**TINY.to_dict(), "se_ratio": 0.0}))
    assert any(isinstance(m, SqueezeExcite) for m in with_se.modules())
    assert not any(isinstance(m, SqueezeExcite) for m in without.modules())
    assert count_parameters(without) < count_parameters(with_se)


def test_backbone_round_trip_has_no_missing_keys() -> None:
    source, target = create_model(TINY), create_model(TINY)
    backbone = source.backbone_state_dict()
    assert backbone and not any(k.startswith("head.") for k in backbone)
    report = target.load_backbone(backbone)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(source.eval().forward_features(x), target.eval().forward_features(x))


def test_invalid_configs_are_rejected_with_reasons(tmp_path) -> None:
    with pytest.raises(ValueError, match="same, non-zero length"):
        ModelConfig(layers=(1, 1), widths=(8,))
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        create_model(ModelConfig(act="tanh"))
    with pytest.raises(ValueError, match=r"unknown model config keys \['depth'\]"):
        ModelConfig.from_dict({"depth": 3})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_yaml(tmp_path / "nope.yaml")
