"""Self-describing checkpoints: one file that rebuilds, preprocesses for and explains a model.

The file holds only plain types and tensors, so it loads with `torch.load(weights_only=True)`
and needs neither Ray nor Lightning: training writes it, serving and evaluation read it.

Two kinds share the format: a `classifier` (the whole DermResNetSE: what serving loads) and a
`backbone` (stem, stages and pooling without the heads: what BYOL pretraining exports and
`jobs/train.py --pretrain-ckpt` starts from).
"""

from __future__ import annotations

import datetime as dt
import io
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dermanet
from dermanet.answer import ModelVersion
from dermanet.classes import CLASS_NAMES
from dermanet.data.transforms import DERM_MEAN, DERM_STD
from dermanet.inference.tta import TTA_MODES
from dermanet.models import DermResNetSE, ModelConfig, create_model
from dermanet.models.dermresnet import HEAD_PREFIXES
from dermanet.storage import atomic_write

CHECKPOINT_FORMAT_VERSION = 2  # 2: adds `kind` (classifier | backbone); 1 is read as classifier
KINDS = ("classifier", "backbone")
REQUIRED_KEYS = {
    "classifier": ("format_version", "model_config", "class_names", "img_size", "state_dict"),
    "backbone": ("format_version", "model_config", "state_dict"),
}


class CheckpointError(ValueError):
    """A file that is not a usable DermaNet checkpoint; the message says what to do."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint rebuilt into an eval-mode model plus everything needed to use it."""

    model: DermResNetSE
    config: ModelConfig
    class_names: list[str]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metrics: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0  # probabilities = softmax(logits / temperature)
    color_constancy: str = "none"  # preprocessing the model was trained with
    tta: str = "none"  # test-time views the server averages (dermanet.inference.tta), set at export
    trust: dict[str, Any] = field(default_factory=dict)  # {"ood": ..., "conformal": ...}
    format_version: int = CHECKPOINT_FORMAT_VERSION
    path: Path | None = None
    version: ModelVersion | None = None  # the exact bytes loaded: every answer carries it


def save_checkpoint(
    path: str | Path,
    model: DermResNetSE,
    *,
    img_size: int,
    mean: tuple[float, ...] = DERM_MEAN,
    std: tuple[float, ...] = DERM_STD,
    metrics: dict | None = None,
    provenance: dict | None = None,
    half: bool = False,
    temperature: float = 1.0,
    preprocessing: dict[str, Any] | None = None,
    trust: dict[str, Any] | None = None,
) -> Path:
    """Write a classifier and its metadata to one file, atomically (temp file + rename).

    `half=True` stores floating-point weights as float16 (half the size); loading casts back.
    `temperature` (fitted on held-out data by jobs/evaluate.py) calibrates served
    probabilities. `trust` holds the gate's OOD statistics and the conformal sets' thresholds
    (dermanet.trust, fitted at export). Readers never see a partial file: the temp name does
    not end in `.pt`.
    """
    if int(img_size) < 8:
        raise ValueError(f"img_size must be at least 8 pixels, got {img_size}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 values each and std > 0; got {mean}, {std}")
    return _write(
        path,
        "classifier",
        model.config,
        {k: _stored_tensor(v, half) for k, v in model.state_dict().items()},
        provenance,
        {
            "class_names": list(CLASS_NAMES),
            "img_size": int(img_size),
            "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
            "preprocessing": to_plain(
                {"color_constancy": "none", **(preprocessing or {})}, "preprocessing"
            ),
            "metrics": to_plain(metrics or {}, "metrics"),
            "calibration": {"temperature": float(temperature)},
            "trust": dict(trust or {}),
        },
    )


def save_backbone(
    path: str | Path,
    model_config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a backbone checkpoint (no classifier-head weights), atomically."""
    head_keys = sorted(k for k in state_dict if k.startswith(HEAD_PREFIXES))
    if head_keys:
        raise ValueError(f"a backbone file holds no classifier-head weights, got {head_keys[:3]}")
    state = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    return _write(path, "backbone", model_config, state, provenance, {})


def _write(
    path: str | Path,
    kind: str,
    model_config: ModelConfig,
    state: dict[str, torch.Tensor],
    provenance: dict | None,
    fields: dict[str, Any],
) -> Path:
    payload = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "kind": kind,
        "model_config": model_config.to_dict(),
        "state_dict": state,
        **fields,
        "provenance": to_plain(
            {
                "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "dermanet_version": dermanet.__version__,
                "torch_version": torch.__version__,
                **(provenance or {}),
            },
            "provenance",
        ),
    }
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def _stored_tensor(tensor: torch.Tensor, half: bool) -> torch.Tensor:
    tensor = tensor.detach().cpu()
    return (tensor.half() if half and tensor.is_floating_point() else tensor).clone()


def to_plain(value: Any, where: str) -> Any:
    """Convert metrics/provenance to the plain types `weights_only` loading accepts."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)  # plain str: subclasses such as TorchVersion fail weights_only
    if isinstance(value, (np.generic, torch.Tensor)) and np.size(value) == 1:
        value = value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(float(value)) else str(float(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(list(value))]
    raise TypeError(
        f"{where} holds a {type(value).__name__}; checkpoints store only numbers, strings, "
        "booleans, lists and dicts"
    )


def read_checkpoint_dict(
    path: str | Path, *, mmap: bool = False, kind: str = "classifier"
) -> dict[str, Any]:
    """Load and validate the raw checkpoint dict of the expected `kind` (no model built).

    `mmap=True` maps tensor storage lazily, so reading metadata stays cheap for big files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{_noun(kind)} {path} does not exist")
    return _validated(path, path, kind, mmap=mmap)


def _noun(kind: str) -> str:
    return "checkpoint" if kind == "classifier" else f"{kind} file"


def _validated(
    source: Path | io.BytesIO, path: Path, kind: str, mmap: bool = False
) -> dict[str, Any]:
    """`torch.load(source)` checked to be a DermaNet file of `kind`; `path` names it."""
    noun = _noun(kind)
    try:
        data = torch.load(source, weights_only=True, map_location="cpu", mmap=mmap)
    except Exception as exc:
        raise CheckpointError(
            f"{path} is not a DermaNet {noun}: torch.load(weights_only=True) cannot read "
            f"it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "write checkpoints with dermanet.inference.save_checkpoint"
        ) from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise CheckpointError(
            f"{path} is not a DermaNet {noun} (no 'format_version'); write checkpoints "
            "with dermanet.inference.save_checkpoint"
        )
    version = data["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, but this dermanet "
            f"({dermanet.__version__}) reads formats up to {CHECKPOINT_FORMAT_VERSION}; "
            "upgrade dermanet"
        )
    found = data.get("kind", "classifier")
    if found != kind:
        hint = {
            "backbone": "it is a BYOL backbone: fine-tune it with jobs/train.py --pretrain-ckpt",
            "classifier": "it is a whole classifier: evaluate or serve it instead",
        }.get(found, f"its kind is {found!r}")
        raise CheckpointError(f"{path} is not a DermaNet {noun}; {hint}")
    missing = [k for k in REQUIRED_KEYS[kind] if k not in data]
    if missing:
        raise CheckpointError(f"{path} is not a complete DermaNet {noun}: missing {missing}")
    if kind == "classifier" and list(data["class_names"]) != list(CLASS_NAMES):
        raise CheckpointError(
            f"{path} was trained for classes {list(data['class_names'])}, but DermaNet's class "
            f"contract is {list(CLASS_NAMES)}; retrain or convert the checkpoint"
        )
    temperature = (data.get("calibration") or {}).get("temperature", 1.0)
    if not (
        isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0
    ):
        raise CheckpointError(
            f"{path}: calibration temperature {temperature!r} is not a number > 0"
        )
    return data


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model (eval mode, float32) and its preprocessing facts from a checkpoint.

    The file is read once; its version (`LoadedCheckpoint.version`) hashes exactly those bytes,
    so a file replaced later cannot be mistaken for the one this model came from.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as handle:
        mtime = os.fstat(handle.fileno()).st_mtime
        data = handle.read()
    return checkpoint_from_bytes(data, path.stem, map_location, path=path, mtime=mtime)


def checkpoint_from_bytes(
    raw: bytes,
    model_id: str,
    map_location: str | torch.device = "cpu",
    *,
    path: Path | None = None,
    mtime: float | None = None,
) -> LoadedCheckpoint:
    """`load_checkpoint` for a checkpoint's bytes (batch inference ships them to its workers).

    `model_id` names the model in answers; `mtime` (the file's, when there is one) dates a
    file that records no creation time of its own.
    """
    where = path or Path(f"<{model_id}.pt>")
    data = _validated(io.BytesIO(raw), where, "classifier")
    created = (data.get("provenance") or {}).get("created_utc")
    version = ModelVersion.of_bytes(model_id, raw, created, mtime)
    try:
        config = ModelConfig.from_dict(dict(data["model_config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: its model_config is invalid: {exc}") from None
    model = create_model(config)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in data["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: weights do not fit its model_config: {str(exc).splitlines()[0]}"
        ) from None
    model.to(map_location).eval()
    norm = data.get("normalization") or {"mean": list(DERM_MEAN), "std": list(DERM_STD)}
    preprocessing = data.get("preprocessing") or {}
    return LoadedCheckpoint(
        model=model,
        config=config,
        class_names=list(data["class_names"]),
        img_size=int(data["img_size"]),
        mean=tuple(float(v) for v in norm["mean"]),
        std=tuple(float(v) for v in norm["std"]),
        metrics=dict(data.get("metrics") or {}),
        provenance=dict(data.get("provenance") or {}),
        temperature=stored_temperature(data),
        color_constancy=str(preprocessing.get("color_constancy", "none")),
        tta=served_views(preprocessing, where),
        trust=dict(data.get("trust") or {}),
        format_version=int(data["format_version"]),
        path=path,
        version=version,
    )


def served_views(preprocessing: dict[str, Any], path: Path) -> str:
    """The test-time views a checkpoint is served with ("none" for files before them)."""
    views = str(preprocessing.get("tta", "none"))
    if views not in TTA_MODES:
        raise CheckpointError(f"{path}: unknown test-time views {views!r}; known: {TTA_MODES}")
    return views


def stored_temperature(data: dict[str, Any]) -> float:
    """The calibration temperature of a validated checkpoint dict; 1.0 (raw softmax) if none."""
    return float((data.get("calibration") or {}).get("temperature", 1.0))


def load_backbone_file(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A backbone checkpoint's model config and state dict (what --pretrain-ckpt loads)."""
    data = read_checkpoint_dict(path, kind="backbone")
    state = data["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")
    try:
        return ModelConfig.from_dict(dict(data["model_config"])), state
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its model_config is invalid: {exc}") from None
