"""Activation factory: the model config names activations by string."""

from __future__ import annotations

from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for `name` (silu, relu or gelu)."""
    try:
        cls = _ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}: choose one of {', '.join(sorted(_ACTIVATIONS))}"
        ) from None
    return cls(inplace=True) if cls in (nn.SiLU, nn.ReLU) else cls()
