"""DermaNet: dermoscopic skin-lesion classification on Ray."""

from dermanet.classes import CLASS_NAMES, MALIGNANT_CLASSES, NUM_CLASSES

__version__ = "0.1.0"
__all__ = ["CLASS_NAMES", "MALIGNANT_CLASSES", "NUM_CLASSES", "__version__"]
