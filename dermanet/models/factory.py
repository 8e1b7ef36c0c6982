"""The one way to create a model: from a config object, a mapping or a YAML path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dermanet.models.config import DEFAULT_CONFIG_PATH, ModelConfig
from dermanet.models.dermresnet import DermResNetSE


def create_model(config: ModelConfig | dict[str, Any] | str | Path | None = None) -> DermResNetSE:
    """Build a DermResNetSE; None means the shipped default (configs/dermanet_default.yaml)."""
    if config is None:
        config = DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else ModelConfig()
    if isinstance(config, (str, Path)):
        config = ModelConfig.from_yaml(config)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return DermResNetSE(config)
