"""Gate refusal reasons as a small fixed vocabulary: the quality check's name, or "ood".

The gate's `reasons` are sentences for people (they carry the measured value and the limit);
metrics and drift reports count them by kind, which must stay a handful of label values. The
sentence openings are the quality checks' own wording (dermanet.trust.quality,
dermanet.trust.evaluation); a test trips every check and checks that each maps back to its name.
"""

from __future__ import annotations

from collections.abc import Iterable

from dermanet.trust.quality import CHECKS

OOD = "ood"
OTHER = "other"  # a reason this table does not know (a newer gate): counted, never dropped
PREFIXES: dict[str, str] = {
    "too small:": "too_small",
    "extreme aspect ratio:": "aspect_ratio",
    "nearly uniform or blank:": "blank",
    "looks like a screen": "flat",
    "too dark:": "dark",
    "over-exposed:": "over_exposed",
    "too blurred:": "blurred",
    "too noisy or grainy:": "noisy",
    "low contrast:": "low_contrast",
    "no colour:": "greyscale",
    "unlike the training images": OOD,
}
KINDS: tuple[str, ...] = (*CHECKS, OOD, OTHER)  # every value `reason_kind` can return


def reason_kind(reason: str) -> str:
    """The kind of one refusal sentence: a quality check's name, "ood" or "other"."""
    text = str(reason).strip().lower()
    for prefix, kind in PREFIXES.items():
        if text.startswith(prefix):
            return kind
    return OTHER


def reason_kinds(reasons: Iterable[str] | None) -> list[str]:
    """The distinct kinds of a refusal's sentences, in first-seen order."""
    return list(dict.fromkeys(reason_kind(reason) for reason in reasons or ()))
