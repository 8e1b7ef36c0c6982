"""Model configuration: a typed dataclass that round-trips through YAML and checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dermanet.classes import NUM_CLASSES


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a DermResNetSE; stored verbatim in every checkpoint."""

    name: str = "DermResNetSE"
    layers: tuple[int, ...] = (2, 2, 2, 2)
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    act: str = "silu"
    se_ratio: float = 0.25
    num_classes: int = NUM_CLASSES
    in_chans: int = 3
    dropout: float = 0.2
    gem_p: float = 3.0
    aux_malignancy_head: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(v) for v in self.layers))
        object.__setattr__(self, "widths", tuple(int(v) for v in self.widths))
        problems = []
        if self.name != "DermResNetSE":
            problems.append(f"name must be 'DermResNetSE', got {self.name!r}")
        if len(self.layers) != len(self.widths) or not self.layers:
            problems.append(
                f"layers {list(self.layers)} and widths {list(self.widths)} need the same, "
                "non-zero length (one entry per stage)"
            )
        if any(v < 1 for v in (*self.layers, *self.widths, self.stem_width)):
            problems.append("layers, widths and stem_width must all be >= 1")
        if self.se_ratio < 0:
            problems.append(f"se_ratio must be >= 0 (0 disables SE), got {self.se_ratio}")
        if self.num_classes < 2:
            problems.append(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.gem_p <= 0:
            problems.append(f"gem_p must be > 0, got {self.gem_p}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature vector (the last stage's channels)."""
        return self.widths[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so it fits YAML and `torch.load(weights_only=True)`."""
        data = asdict(self)
        data["layers"] = list(self.layers)
        data["widths"] = list(self.widths)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a mapping, rejecting unknown keys with their names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; valid keys are {sorted(known - {'extra'})}"
            )
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """Read a YAML file whose `model:` section (or top level) holds the config."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} does not exist")
        with path.open() as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"model config {path} must be a YAML mapping")
        section = data.get("model", data)
        return cls.from_dict(section)


DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "dermanet_default.yaml"
