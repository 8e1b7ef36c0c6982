"""The class contract shared by every part of DermaNet (index order is fixed)."""

from __future__ import annotations

# ISIC 2019 training classes in alphabetical order; the index of a name is its logit index.
CLASS_NAMES: tuple[str, ...] = ("AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC")
NUM_CLASSES = len(CLASS_NAMES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
MALIGNANT_CLASSES: frozenset[str] = frozenset({"MEL", "BCC", "SCC"})

# Human-readable names, for reports and the dashboard.
CLASS_DESCRIPTIONS: dict[str, str] = {
    "AK": "Actinic keratosis",
    "BCC": "Basal cell carcinoma",
    "BKL": "Benign keratosis",
    "DF": "Dermatofibroma",
    "MEL": "Melanoma",
    "NV": "Melanocytic nevus",
    "SCC": "Squamous cell carcinoma",
    "VASC": "Vascular lesion",
}


def is_malignant(label: str) -> bool:
    """True for the classes the risk contract counts as malignant (MEL, BCC, SCC)."""
    return label in MALIGNANT_CLASSES


def malignant_mask() -> list[bool]:
    """Per-index malignancy flags in CLASS_NAMES order, for vectorised targets."""
    return [is_malignant(name) for name in CLASS_NAMES]
