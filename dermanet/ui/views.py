"""HTML pieces of the dashboard (traffic light, risk score on its scale, tables) and its CSS.

Pure functions of the server's answer, escaped, so the page and the case report agree and
tests can read them. Nothing here computes risk: the numbers are the server's. The risk is a
score on the scale of the server's policy (e.g. 0-1.5), never shown as a probability. An
image the server's gate refused gets a grey light and the reason instead of a risk level, no
score, and its probabilities marked as unreliable; an accepted one shows its plausible classes. The
similar confirmed cases (`/v1/similar`) are a strip of thumbnails with diagnosis and distance,
and their vote is a column beside the model's probabilities.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dermanet.classes import CLASS_DESCRIPTIONS, CLASS_NAMES, is_malignant
from dermanet.ui.client import Classification, ServeBusy, ServeError, SimilarCases

NOTICE = (
    "Research software, not a medical device. DermaNet does not diagnose: never use its output "
    "for clinical decisions."
)
LIGHT_COLOURS = {"green": "#1e9e5a", "yellow": "#e0a800", "red": "#d63a3a", "unknown": "#9ca3af"}
LIGHT_LABELS = {
    "green": "Low risk",
    "yellow": "Intermediate risk",
    "red": "High risk",
    "unknown": "Not assessed",  # the gate refused the image: no risk level is claimed
}
REFUSED = "This does not look like a dermoscopic image"
UNRELIABLE = "unreliable: the image was refused"
MODE_LABELS = {"overlay": "Overlay", "heatmap": "Heatmap", "side_by_side": "Side by side"}

CSS = """
<style>
.dn-light {display:inline-flex; align-items:center; gap:.45rem; font-weight:600;
  font-size:.9rem; padding:.15rem .6rem; border-radius:999px; background:#f3f4f6;}
.dn-dot {width:.85rem; height:.85rem; border-radius:50%; display:inline-block;
  box-shadow:0 0 0 2px rgba(0,0,0,.08) inset;}
.dn-light-green {color:#17603a; background:#e3f5ea;}
.dn-light-yellow {color:#7a5a00; background:#fff4d1;}
.dn-light-red {color:#8e1f1f; background:#fde4e4;}
.dn-light-unknown {color:#374151; background:#eceef1;}
.dn-light-big {font-size:1.15rem; padding:.35rem .9rem;}
.dn-light-big .dn-dot {width:1.2rem; height:1.2rem;}
.dn-risk {margin:.5rem 0 .7rem 0;}
.dn-risk-line {font-variant-numeric:tabular-nums; margin-bottom:.3rem;}
.dn-risk-track {position:relative; display:flex; height:.7rem; border-radius:4px;
  overflow:visible; opacity:.85;}
.dn-zone {height:100%;}
.dn-zone:first-child {border-radius:4px 0 0 4px;} .dn-zone:last-child {border-radius:0 4px 4px 0;}
.dn-risk-marker {position:absolute; top:-.3rem; width:.25rem; height:1.3rem; margin-left:-.125rem;
  background:#111827; border-radius:2px; box-shadow:0 0 0 2px #fff;}
.dn-top {font-size:1.05rem; margin:.2rem 0 .1rem 0;}
.dn-muted {color:#6b7280; font-size:.85rem;}
.dn-card-name {font-size:.82rem; color:#374151; overflow:hidden; text-overflow:ellipsis;
  white-space:nowrap; margin:.1rem 0 .2rem 0;}
.dn-refusal, .dn-caveat {border-left:4px solid #9ca3af; background:#f3f4f6; padding:.5rem .8rem;
  border-radius:4px; color:#1f2937; margin:.5rem 0;}
.dn-not-assessed {color:#6b7280; font-style:italic;}
.dn-set {font-size:.95rem; margin:.1rem 0 .3rem 0;}
.dn-cases {display:flex; flex-wrap:wrap; gap:.6rem; margin:.3rem 0 .5rem 0;}
.dn-case {margin:0; width:6.6rem; font-size:.78rem; color:#374151;}
.dn-case img, .dn-case-blank {width:6.6rem; height:6.6rem; object-fit:cover; border-radius:6px;
  border:1px solid #e5e7eb; display:block; background:#f3f4f6;}
.dn-case-blank {display:flex; align-items:center; justify-content:center; color:#9ca3af;}
.dn-case figcaption {margin-top:.15rem; line-height:1.25;}
.dn-case-malignant figcaption b {color:#8e1f1f;}
.dn-notice {border-left:4px solid #d97706; background:#fffbeb; padding:.55rem .8rem;
  border-radius:4px; color:#78350f; font-size:.9rem; margin-bottom:.6rem;}
</style>
"""


def notice_html() -> str:
    return f'<div class="dn-notice" role="note"><b>⚠ {html.escape(NOTICE)}</b></div>'


def traffic_light_html(
    light: str,
    risk: float | None = None,
    big: bool = False,
    compact: bool = False,
    note: str = "",
) -> str:
    """A coloured dot with its label, e.g. "High risk · score 0.71"; unknown lights are grey
    ("unknown": the gate refused the image, "Not assessed").

    `compact` (gallery cards) shows the label only; the score and `note` are in the tooltip.
    """
    light = str(light)
    colour = LIGHT_COLOURS.get(light, LIGHT_COLOURS["unknown"])
    label = LIGHT_LABELS.get(light, "Not classified")
    score = f"risk score {risk:.2f}" if risk is not None else ""
    shown = f"{label} · {score}" if score and not compact else label
    size = " dn-light-big" if big else ""
    title = f"traffic light {light}" + (f", {score}" if score else "")
    title += f": {note}" if note else ""
    return (
        f'<span class="dn-light dn-light-{html.escape(light)}{size}" data-light="'
        f'{html.escape(light)}" title="{html.escape(title)}">'
        f'<span class="dn-dot" style="background:{colour}"></span>{html.escape(shown)}</span>'
    )


def _reasons(result: Classification) -> str:
    return "; ".join(result.reasons) or "the server gave no reason"


def refusal_text(result: Classification) -> str:
    """For a refused image: This does not look like a dermoscopic image (its reasons).
    Empty for an accepted one."""
    return f"{REFUSED} ({_reasons(result)})." if result.refused else ""


def refusal_html(result: Classification) -> str:
    """The message shown in place of a risk level when the gate refused the image."""
    if not result.refused:
        return ""
    return (
        f'<div class="dn-refusal" role="alert" data-refused="true"><b>{html.escape(REFUSED)}</b>'
        f" ({html.escape(_reasons(result))}). "
        "No risk level is given; use a dermoscopic image of the lesion.</div>"
    )


def card_light_html(result: Classification | None) -> str:
    """A gallery card's light: the risk colour, grey for a refused image (reason in the
    tooltip), or grey "Not classified" while there is no answer."""
    if result is None:
        return traffic_light_html("none", compact=True)
    return traffic_light_html(
        result.traffic_light, result.risk, compact=True, note=refusal_text(result)
    )


@dataclass(frozen=True)
class RiskScale:
    """The scale a risk score is read on, from the server's policy (`/v1/models`).

    The score is a weighted sum of class probabilities, not a probability: it runs from 0 to
    the largest class weight (the probabilities sum to 1), e.g. 0-1.5 for 1.5·P(MEL) +
    1.3·P(BCC) + 1.0·P(SCC); green below `green_below`, red from `yellow_below` on.
    """

    top: float
    green_below: float
    yellow_below: float

    @classmethod
    def from_policy(cls, policy: Mapping[str, Any] | None) -> RiskScale | None:
        """None when the server sent no usable policy (the score is then shown bare)."""
        policy = policy or {}
        try:
            top = max(float(w) for w in (policy.get("weights") or {}).values())
            green, yellow = float(policy["green_below"]), float(policy["yellow_below"])
        except (KeyError, TypeError, ValueError):
            return None
        return cls(max(top, yellow), green, yellow) if top > 0 else None

    def text(self) -> str:
        """on 0–1.5; green < 0.15, red ≥ 0.6"""
        return f"on 0–{self.top:g}; green < {self.green_below:g}, red ≥ {self.yellow_below:g}"


NOT_ASSESSED = "Risk score: not assessed (the image was refused)"


def risk_score_text(result: Classification, scale: RiskScale | None = None) -> str:
    """Risk score 1.16 on 0–1.5; green < 0.15, red ≥ 0.6 (the server's score, never a
    percentage); for a refused image, that it was not assessed."""
    if result.risk is None:
        return NOT_ASSESSED
    return f"Risk score {result.risk:.2f}" + (f" {scale.text()}" if scale else "")


def risk_score_html(result: Classification, scale: RiskScale | None = None) -> str:
    """The score on its scale: a track coloured by the traffic-light zones with a marker at
    the score; a "not assessed" line for an image the gate refused."""
    if result.risk is None:
        return f'<div class="dn-risk dn-not-assessed" data-risk="not-assessed">{NOT_ASSESSED}</div>'
    line = (
        f'<div class="dn-risk-line">Risk score <b>{result.risk:.2f}</b>'
        + (f' <span class="dn-muted">{html.escape(scale.text())}</span>' if scale else "")
        + "</div>"
    )
    track = ""
    if scale is not None:
        edges = (0.0, scale.green_below, scale.yellow_below, scale.top)
        zones = "".join(
            f'<div class="dn-zone" style="width:{(hi - lo) / scale.top * 100:.2f}%;'
            f'background:{LIGHT_COLOURS[light]}"></div>'
            for light, lo, hi in zip(("green", "yellow", "red"), edges[:-1], edges[1:], strict=True)
        )
        at = max(0.0, min(1.0, result.risk / scale.top)) * 100
        track = (
            f'<div class="dn-risk-track">{zones}'
            f'<div class="dn-risk-marker" style="left:{at:.2f}%"></div></div>'
        )
    return f'<div class="dn-risk" data-risk="{result.risk:.4f}">{line}{track}</div>'


def _top_lead(result: Classification) -> str:
    return "Most likely" if result.accepted else f"Top class ({UNRELIABLE})"


def top_class_text(result: Classification) -> str:
    """Most likely: Melanoma (MEL, 86.0%); for a refused image marked as unreliable."""
    name = CLASS_DESCRIPTIONS.get(result.top_class, result.top_class)
    return f"{_top_lead(result)}: {name} ({result.top_class}, {result.top_probability:.1%})"


def set_text(result: Classification) -> str:
    """Plausible classes (90 % set): MEL, NV, BKL. Empty when there is no set to show: the
    model has no conformal statistics, or the image was refused (the coverage is stated for
    dermoscopic images like the calibration ones)."""
    if result.refused or not result.prediction_set:
        return ""
    coverage = f"{result.set_coverage * 100:.0f} % set" if result.set_coverage else "set"
    return f"Plausible classes ({coverage}): {', '.join(result.prediction_set)}"


def top_class_html(result: Classification) -> str:
    """The top class and, beside it, the set of plausible classes."""
    name = CLASS_DESCRIPTIONS.get(result.top_class, result.top_class)
    top = (
        f'<div class="dn-top">{html.escape(_top_lead(result))}: <b>{html.escape(name)}</b> '
        f"({html.escape(result.top_class)}, {result.top_probability:.1%})</div>"
    )
    text = set_text(result)
    if not text:
        return top
    names = ", ".join(f"{c}: {CLASS_DESCRIPTIONS.get(c, c)}" for c in result.prediction_set or ())
    return (
        top + f'<div class="dn-set" data-set="{html.escape(",".join(result.prediction_set or ()))}"'
        f' title="{html.escape(names)}">{html.escape(text)}</div>'
    )


def probabilities_title(result: Classification) -> str:
    """Heading of the all-classes table; marked when the probabilities are not trusted."""
    title = "Probabilities of all classes"
    return title if result.probabilities_trusted else f"{title} ({UNRELIABLE})"


def probability_rows(
    result: Classification, cases: SimilarCases | None = None
) -> list[dict[str, Any]]:
    """All classes, most probable first: code, name, malignant flag, probability, and with
    `cases` the nearest cases' vote beside it (VOTE_COLUMN)."""
    rows = [
        {
            "Class": name,
            "Name": CLASS_DESCRIPTIONS.get(name, name),
            "Malignant": is_malignant(name),
            "Probability": float(result.probabilities[name]),
        }
        | ({VOTE_COLUMN: float(cases.knn_probabilities[name])} if cases is not None else {})
        for name in CLASS_NAMES
    ]
    return sorted(rows, key=lambda row: row["Probability"], reverse=True)


SIMILAR_TITLE = "Similar confirmed cases"
VOTE_COLUMN = "k-NN vote"


def similar_caveat(cases: SimilarCases) -> str:
    """Said above the cases of an image the gate refused; empty otherwise."""
    if cases.accepted:
        return ""
    return "The image was refused: the nearest cases of an image unlike dermoscopy mean little."


def similar_cases_html(cases: SimilarCases, thumbnails: Sequence[bytes | None]) -> str:
    """The neighbours nearest first: thumbnail (or a blank), diagnosis and distance."""
    figures = []
    for case, thumb in zip(cases.neighbours, thumbnails, strict=True):
        name = CLASS_DESCRIPTIONS.get(case.label, case.label)
        alt = html.escape(f"{case.image} ({case.label})")
        picture = (
            f'<img alt="{alt}" src="data:image/jpeg;base64,{base64.b64encode(thumb).decode()}">'
            if thumb
            else f'<div class="dn-case-blank" title="{alt}">no picture</div>'
        )
        malignant = " dn-case-malignant" if is_malignant(case.label) else ""
        figures.append(
            f'<figure class="dn-case{malignant}" data-label="{html.escape(case.label)}" '
            f'data-image="{html.escape(case.image)}" data-distance="{case.distance:.4f}">'
            f"{picture}<figcaption><b>{html.escape(case.label)}</b> {html.escape(name)}<br>"
            f'<span class="dn-muted">distance {case.distance:.3f}</span></figcaption></figure>'
        )
    caveat = similar_caveat(cases)
    note = f'<div class="dn-caveat" data-similar-caveat="true">{html.escape(caveat)}</div>'
    strip = f'<div class="dn-cases" data-k="{cases.k}">' + "".join(figures) + "</div>"
    return (note if caveat else "") + strip


def knn_vote_text(cases: SimilarCases, result: Classification | None = None) -> str:
    """Vote of the 8 nearest confirmed cases (class-balanced): Melanoma (MEL) 62.0%; the
    model: Melanoma (MEL) 86.0%."""
    top = cases.knn_top_class
    text = (
        f"Vote of the {cases.k} nearest confirmed cases ({cases.vote}): "
        f"{CLASS_DESCRIPTIONS.get(top, top)} ({top}) {cases.knn_probabilities[top]:.1%}"
    )
    if result is not None:
        model = result.top_class
        text += (
            f"; the model: {CLASS_DESCRIPTIONS.get(model, model)} ({model}) "
            f"{result.top_probability:.1%}"
        )
    return text


def class_label(name: str | None, predicted: str | None = None) -> str:
    """Label of the Grad-CAM class choice; None means "the predicted class"."""
    if name is None:
        return f"Predicted class ({predicted})" if predicted else "Predicted class"
    return f"{name} · {CLASS_DESCRIPTIONS.get(name, name)}"


def model_label(model_id: str, default: str) -> str:
    return f"{model_id} (default)" if model_id == default else model_id


def model_summary(info: dict[str, Any]) -> str:
    """One line about a checkpoint from `/v1/models` (input, a headline metric, data, date)."""
    parts = []
    if info.get("img_size"):
        parts.append(f"input {info['img_size']} px")
    metrics = info.get("metrics") or {}
    for key in ("balanced_accuracy", "val_balanced_accuracy", "val/balanced_accuracy"):
        if isinstance(metrics.get(key), int | float):
            parts.append(f"balanced accuracy {metrics[key]:.3f}")
            break
    data = (info.get("provenance") or {}).get("data")
    if data:
        parts.append(f"data: {data}")
    if info.get("modified_utc"):
        parts.append(f"saved {str(info['modified_utc'])[:10]}")
    return " · ".join(parts)


def model_trust_lines(info: dict[str, Any]) -> list[str]:
    """What the checkpoint's gate checks and how its prediction sets were calibrated (from
    `/v1/models`), e.g. ["Gate: quality checks + OOD score (...)", "Sets: split conformal
    ..."]; empty for a server from before the gate."""
    lines = []
    gate = info.get("gate") or {}
    if gate.get("description"):
        lines.append(f"Gate: {gate['description']}")
    sets = info.get("prediction_sets") or {}
    if sets.get("description"):
        lines.append(f"Prediction sets: {sets['description']}")
    return lines


def server_problem(exc: ServeError) -> str:
    """The page's one-line Markdown for a request the server did not answer: busy (it turned
    us away after every advised retry) reads differently from unreachable."""
    if isinstance(exc, ServeBusy):
        return f"**The DermaNet server is busy.** {exc}"
    return f"**The DermaNet server is not reachable.** {exc}"
