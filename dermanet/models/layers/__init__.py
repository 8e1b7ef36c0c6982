"""Network building blocks, one per module (timm style)."""

from dermanet.models.layers.activations import make_activation
from dermanet.models.layers.basic_block import BasicBlockSE
from dermanet.models.layers.gem import GeM
from dermanet.models.layers.squeeze_excite import SqueezeExcite

__all__ = ["BasicBlockSE", "GeM", "SqueezeExcite", "make_activation"]
