"""Networks: DermResNetSE and its building blocks."""

from dermanet.models.byol import (
    BYOL,
    BYOLOutput,
    cosine_momentum,
    embedding_std,
)
from dermanet.models.config import DEFAULT_CONFIG_PATH, ModelConfig
from dermanet.models.dermresnet import (
    BackboneLoadReport,
    DermNetOutput,
    DermResNetSE,
    count_parameters,
)
from dermanet.models.factory import create_model
from dermanet.models.losses import byol_loss

__all__ = [
    "BYOL",
    "DEFAULT_CONFIG_PATH",
    "BYOLOutput",
    "BackboneLoadReport",
    "DermNetOutput",
    "DermResNetSE",
    "ModelConfig",
    "byol_loss",
    "cosine_momentum",
    "count_parameters",
    "create_model",
    "embedding_std",
]
