"""Networks: DermResNetSE and its building blocks."""

from dermanet.models.config import DEFAULT_CONFIG_PATH, ModelConfig
from dermanet.models.dermresnet import (
    BackboneLoadReport,
    DermNetOutput,
    DermResNetSE,
    count_parameters,
)
from dermanet.models.factory import create_model

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "BackboneLoadReport",
    "DermNetOutput",
    "DermResNetSE",
    "ModelConfig",
    "count_parameters",
    "create_model",
]
