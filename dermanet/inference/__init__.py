"""Inference: self-describing checkpoints, the model registry, prediction, risk and Grad-CAM.

Needs neither Ray nor Lightning; `dermanet.serving` puts it behind HTTP.
"""

from dermanet.inference.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from dermanet.inference.gradcam import (
    RENDER_MODES,
    Explanation,
    GradCamExplainer,
    compute_cams,
    render,
)
from dermanet.inference.predictor import Prediction, Predictor, UnknownClassError, resolve_class
from dermanet.inference.registry import (
    DefaultChoice,
    ModelInfo,
    ModelRegistry,
    ModelUnavailableError,
    NoCheckpointsError,
    RegistryError,
    UnknownModelError,
)
from dermanet.inference.risk import DEFAULT_RISK_WEIGHTS, RiskAssessment, RiskPolicy

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "DEFAULT_RISK_WEIGHTS",
    "RENDER_MODES",
    "CheckpointError",
    "DefaultChoice",
    "Explanation",
    "GradCamExplainer",
    "LoadedCheckpoint",
    "ModelInfo",
    "ModelRegistry",
    "ModelUnavailableError",
    "NoCheckpointsError",
    "Prediction",
    "Predictor",
    "RegistryError",
    "RiskAssessment",
    "RiskPolicy",
    "UnknownClassError",
    "UnknownModelError",
    "compute_cams",
    "load_checkpoint",
    "render",
    "resolve_class",
    "save_checkpoint",
]
