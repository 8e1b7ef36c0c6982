"""Training: shared optimisation utilities, the BYOL LightningModule and training callbacks."""

from dermanet.train.byol_module import BYOLModule
from dermanet.train.monitor import GradientMonitor, NonFiniteTrainingError
from dermanet.train.optim import (
    LARS,
    build_optimizer,
    param_groups,
    warmup_cosine_factor,
    warmup_cosine_schedule,
)

__all__ = [
    "LARS",
    "BYOLModule",
    "GradientMonitor",
    "NonFiniteTrainingError",
    "build_optimizer",
    "param_groups",
    "warmup_cosine_factor",
    "warmup_cosine_schedule",
]
