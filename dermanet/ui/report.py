"""Case reports: one image, its prediction, all probabilities, Grad-CAM, model id and date.

The report says what the dashboard says: the risk score on its scale (never a percentage); a
refused image has a grey light and the reason in place of a risk level, no score, and its
probabilities marked as unreliable; an accepted one has its set of plausible classes beside
the top class. With similar cases, the report shows them (thumbnail, diagnosis, distance) and
their vote as a column beside the probabilities.

`render_html` writes one self-contained HTML file (images inline as data URIs); `render_pdf`
writes a one-page PDF with fpdf2 (pure Python). Both carry the research-tool notice.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

from dermanet.classes import CLASS_DESCRIPTIONS
from dermanet.ui.cases import case_thumbnails
from dermanet.ui.client import (
    Classification,
    GradCamImage,
    ModelListing,
    ServeClient,
    SimilarCases,
)
from dermanet.ui.storage import StoredImage, UploadStore
from dermanet.ui.views import (
    CSS,
    LIGHT_COLOURS,
    LIGHT_LABELS,
    MODE_LABELS,
    NOTICE,
    SIMILAR_TITLE,
    VOTE_COLUMN,
    RiskScale,
    knn_vote_text,
    probabilities_title,
    probability_rows,
    refusal_html,
    refusal_text,
    risk_score_html,
    risk_score_text,
    set_text,
    similar_cases_html,
    similar_caveat,
    top_class_html,
    top_class_text,
    traffic_light_html,
)


class ReportUnavailable(RuntimeError):
    """A report format that cannot be produced here (e.g. fpdf2 not installed)."""


@dataclass(frozen=True)
class CaseReport:
    """Everything a report shows; images are the bytes as uploaded / as the server rendered."""

    image_name: str
    image: bytes
    image_mime: str
    result: Classification
    gradcam_png: bytes | None = None
    gradcam_target: str | None = None
    gradcam_mode: str | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    risk_policy: dict[str, Any] = field(default_factory=dict)
    created: dt.datetime = field(default_factory=lambda: dt.datetime.now().astimezone())
    similar: SimilarCases | None = None
    similar_thumbnails: tuple[bytes | None, ...] = ()  # one per case; default: case_thumbnails

    def case_pictures(self) -> list[bytes | None]:
        """A picture per similar case (the index's thumbnails, else derm-sample's images)."""
        if self.similar is None:
            return []
        if len(self.similar_thumbnails) == self.similar.k:
            return list(self.similar_thumbnails)
        return case_thumbnails(self.similar.neighbours)

    @property
    def created_text(self) -> str:
        return self.created.strftime("%Y-%m-%d %H:%M %Z").strip()


def build_case_report(
    client: ServeClient,
    store: UploadStore,
    image: StoredImage,
    result: Classification,
    listing: ModelListing,
    gradcam: GradCamImage | None = None,
    similar: SimilarCases | None = None,
) -> CaseReport:
    """The report of what the dashboard shows: its Grad-CAM render if one is on screen, else
    the server's overlay for the predicted class (one request), and the similar cases shown."""
    data = store.read(image.image_id)
    if gradcam is None:  # the signed-in user's client: Grad-CAM needs their key too
        gradcam = client.gradcam(image.original_name, data, model=result.model_id)
    return CaseReport(
        image_name=image.original_name,
        image=data,
        image_mime=image.mime,
        result=result,
        gradcam_png=gradcam.png,
        gradcam_target=gradcam.target_class,
        gradcam_mode=gradcam.mode,
        model_info=listing.info(result.model_id),
        risk_policy=listing.risk_policy,
        similar=similar,
    )


def report_filename(report: CaseReport, extension: str) -> str:
    """`dermanet-report-<image stem>-<YYYYmmdd-HHMM>.<ext>` with a filesystem-safe stem."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", report.image_name.rsplit(".", 1)[0]).strip("._")
    return f"dermanet-report-{stem[:40] or 'image'}-{report.created:%Y%m%d-%H%M}.{extension}"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _policy_text(policy: dict[str, Any]) -> str:
    weights = policy.get("weights") or {}
    if not weights:
        return ""
    terms = " + ".join(f"{w:g}·P({name})" for name, w in weights.items())
    return (
        f"risk = {terms}; green below {policy.get('green_below', '?')}, yellow below "
        f"{policy.get('yellow_below', '?')}, red otherwise (the server's policy)."
    )


def render_html(report: CaseReport) -> str:
    """A self-contained HTML page (no external resources)."""
    r = report.result
    esc = html.escape
    cases = report.similar
    vote_head = f"<th>{VOTE_COLUMN} (k={cases.k})</th>" if cases else ""
    rows = "".join(
        f"<tr><td>{esc(row['Class'])}</td><td>{esc(row['Name'])}</td>"
        f"<td>{'yes' if row['Malignant'] else ''}</td>"
        f"<td class='num'>{row['Probability']:.2%}</td>"
        + (f"<td class='num'>{row[VOTE_COLUMN]:.2%}</td>" if cases else "")
        + "</tr>"
        for row in probability_rows(r, cases)
    )
    similar = ""
    if cases is not None:
        similar = (
            f"<h2>{esc(SIMILAR_TITLE)}</h2>"
            f"<p>{esc(knn_vote_text(cases, r))}</p>"
            f"{similar_cases_html(cases, report.case_pictures())}"
            "<p class='dn-muted'>Nearest training images by the model's features (distance = "
            "1 - cosine similarity); diagnoses as confirmed in the training data.</p>"
        )
    gradcam = ""
    if report.gradcam_png:
        target = report.gradcam_target or r.top_class
        mode = MODE_LABELS.get(report.gradcam_mode or "", report.gradcam_mode or "")
        gradcam = (
            f"<figure><img alt='Grad-CAM' src='{_data_uri(report.gradcam_png, 'image/png')}'>"
            f"<figcaption>Grad-CAM for {esc(target)} "
            f"({esc(CLASS_DESCRIPTIONS.get(target, target))}), {esc(mode)}</figcaption></figure>"
        )
    info = report.model_info
    provenance = (info.get("provenance") or {}).get("data", "")
    model_note = f" ({esc(str(provenance))})" if provenance else ""
    policy = _policy_text(report.risk_policy)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>DermaNet case report: {esc(report.image_name)}</title>
{CSS}
<style>
body {{font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:#111827;
  max-width: 900px; margin: 2rem auto; padding: 0 1rem;}}
h1 {{font-size:1.5rem; margin-bottom:.2rem;}}
.meta td {{padding:.15rem 1rem .15rem 0; color:#374151;}}
.figs {{display:flex; gap:1rem; flex-wrap:wrap; margin:1rem 0;}}
figure {{margin:0;}} figure img {{max-width:420px; max-height:360px; border-radius:6px;
  border:1px solid #e5e7eb;}}
figcaption {{font-size:.85rem; color:#6b7280;}}
table.probs {{border-collapse:collapse; min-width:28rem;}}
table.probs td, table.probs th {{border-bottom:1px solid #e5e7eb; padding:.3rem .6rem;
  text-align:left;}}
td.num {{text-align:right; font-variant-numeric:tabular-nums;}}
</style></head><body>
<h1>DermaNet case report</h1>
<div class="dn-notice"><b>⚠ {esc(NOTICE)}</b></div>
<table class="meta">
<tr><td>Image</td><td>{esc(report.image_name)}</td></tr>
<tr><td>Model</td><td>{esc(r.model_id)}{model_note}</td></tr>
<tr><td>Date</td><td>{esc(report.created_text)}</td></tr>
</table>
<div class="figs">
<figure><img alt="uploaded image" src="{_data_uri(report.image, report.image_mime)}">
<figcaption>Uploaded image</figcaption></figure>
{gradcam}
</div>
<h2>Prediction</h2>
<p>{traffic_light_html(r.traffic_light, r.risk, big=True)}</p>
{refusal_html(r)}
{top_class_html(r)}
{risk_score_html(r, RiskScale.from_policy(report.risk_policy))}
<p class="dn-muted">{esc(policy)}</p>
<h2>{esc(probabilities_title(r))}</h2>
<table class="probs"><tr><th>Class</th><th>Name</th><th>Malignant</th><th>Probability</th>\
{vote_head}</tr>
{rows}</table>
{similar}
<p class="dn-muted">Generated by DermaNet on {esc(report.created_text)}.</p>
</body></html>
"""


def _latin1(text: str) -> str:
    """fpdf2's core fonts are Latin-1: replace what they cannot show."""
    text = str(text).replace("·", "x").replace("—", "-").replace("…", "...").replace("⚠", "!")
    text = text.replace("–", "-").replace("≥", ">=")
    return text.encode("latin-1", "replace").decode("latin-1")


def _hex_rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


def _rgb(data: bytes) -> Image.Image:
    """Any JPEG/PNG (16-bit, palette, alpha) as 8-bit RGB, which every PDF reader shows."""
    with Image.open(io.BytesIO(data)) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def render_pdf(report: CaseReport) -> bytes:
    """A one-page A4 PDF (fpdf2).

    Every coloured fill is drawn inside `pdf.local_context(fill_color=...)`: fpdf2's tables take
    the fill colour in force when they start as their cells' background, so a colour left set
    after the bars once painted the whole probability table the malignant bar's orange.
    """
    try:
        from fpdf import FPDF, FontFace
    except ImportError:
        raise ReportUnavailable(
            "PDF reports need the fpdf2 package: `.venv/bin/pip install fpdf2`; HTML works"
        ) from None
    r = report.result
    pdf = FPDF(format="A4", unit="mm")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.set_title(_latin1(f"DermaNet case report: {report.image_name}"))
    pdf.set_creator("DermaNet")
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin
    pdf.set_font("Helvetica", "B", 17)
    pdf.cell(width, 9, "DermaNet case report", new_x="LMARGIN", new_y="NEXT")
    with pdf.local_context(fill_color=(255, 251, 235), text_color=(120, 53, 15)):
        pdf.set_font("Helvetica", "B", 9)
        pdf.multi_cell(width, 5, _latin1(NOTICE), fill=True, new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(17, 24, 39)
    pdf.ln(2)
    pdf.set_font("Helvetica", "", 10)
    for key, value in (
        ("Image", report.image_name),
        ("Model", r.model_id),
        ("Date", report.created_text),
    ):
        pdf.cell(22, 6, key)
        pdf.cell(width - 22, 6, _latin1(value), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    top = pdf.get_y()
    side = 72.0 if report.similar else 80.0
    pdf.image(_rgb(report.image), x=pdf.l_margin, y=top, w=side, h=side, keep_aspect_ratio=True)
    if report.gradcam_png:
        x = pdf.l_margin + side + 6
        pdf.image(_rgb(report.gradcam_png), x=x, y=top, w=side, h=side, keep_aspect_ratio=True)
        pdf.set_xy(x, top + side + 1)
        pdf.set_font("Helvetica", "I", 8)
        target = report.gradcam_target or r.top_class
        mode = MODE_LABELS.get(report.gradcam_mode or "", report.gradcam_mode or "")
        pdf.cell(side, 4, _latin1(f"Grad-CAM for {target}, {mode}"))
    pdf.set_xy(pdf.l_margin, top + side + 7)
    # traffic light
    y = pdf.get_y()
    with pdf.local_context(fill_color=_hex_rgb(LIGHT_COLOURS.get(r.traffic_light, "#9ca3af"))):
        pdf.ellipse(pdf.l_margin, y + 0.5, 5, 5, style="F")
    pdf.set_x(pdf.l_margin + 7)
    pdf.set_font("Helvetica", "B", 12)
    label = LIGHT_LABELS.get(r.traffic_light, r.traffic_light)
    label += f" (risk score {r.risk:.2f})" if r.risk is not None else ""
    pdf.cell(width - 7, 6, _latin1(label), new_x="LMARGIN", new_y="NEXT")
    if r.refused:
        pdf.set_font("Helvetica", "B", 10)
        pdf.multi_cell(width, 5, _latin1(refusal_text(r)), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 10)
    pdf.cell(width, 6, _latin1(top_class_text(r)), new_x="LMARGIN", new_y="NEXT")
    if set_text(r):
        pdf.cell(width, 6, _latin1(set_text(r)), new_x="LMARGIN", new_y="NEXT")
    _pdf_risk(pdf, r, RiskScale.from_policy(report.risk_policy), width)
    policy = _policy_text(report.risk_policy)
    if policy:
        pdf.set_font("Helvetica", "I", 8)
        pdf.multi_cell(width, 4, _latin1(policy), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(width, 6, _latin1(probabilities_title(r)), new_x="LMARGIN", new_y="NEXT")
    cases = report.similar
    headings = ["Class", "Name", "Malignant", "Probability"]
    columns: tuple[float, ...] = (18, 70, 22, 26)
    if cases is not None:
        headings.append(f"{VOTE_COLUMN} (k={cases.k})")
        columns += (30,)
    with pdf.table(
        col_widths=columns,
        width=sum(columns),
        align="LEFT",
        text_align="LEFT",
        line_height=5.5,
        headings_style=FontFace(emphasis="BOLD", fill_color=(243, 244, 246)),
    ) as table:
        pdf.set_font("Helvetica", "", 9)
        table.row(headings)
        for row in probability_rows(r, cases):
            cells = [
                row["Class"],
                _latin1(row["Name"]),
                "yes" if row["Malignant"] else "",
                f"{row['Probability']:.2%}",
            ]
            if cases is not None:
                cells.append(f"{row[VOTE_COLUMN]:.2%}")
            table.row(cells)
    if cases is not None:
        _pdf_similar(pdf, cases, report.case_pictures(), r, width)
    return bytes(pdf.output())


def _pdf_risk(pdf: Any, r: Classification, scale: RiskScale | None, width: float) -> None:
    """The risk score on its scale: the line of text and a track coloured by the light zones
    with a marker at the score; a refused image has no risk assessment."""
    pdf.set_font("Helvetica", "I" if r.risk is None else "", 10)
    pdf.cell(width, 6, _latin1(risk_score_text(r, scale)), new_x="LMARGIN", new_y="NEXT")
    if r.risk is None or scale is None:
        return
    y, track = pdf.get_y() + 1.5, width * 0.6
    edges = (0.0, scale.green_below, scale.yellow_below, scale.top)
    for light, lo, hi in zip(("green", "yellow", "red"), edges[:-1], edges[1:], strict=True):
        with pdf.local_context(fill_color=_hex_rgb(LIGHT_COLOURS[light])):
            pdf.rect(pdf.l_margin + lo / scale.top * track, y, (hi - lo) / scale.top * track, 3,
                     style="F")  # fmt: skip
    at = pdf.l_margin + max(0.0, min(1.0, r.risk / scale.top)) * track
    with pdf.local_context(fill_color=(17, 24, 39)):
        pdf.rect(at - 0.5, y - 1.2, 1.0, 5.4, style="F")
    pdf.set_xy(pdf.l_margin, y + 5.5)


def _pdf_similar(
    pdf: Any,
    cases: SimilarCases,
    pictures: list[bytes | None],
    result: Classification,
    width: float,
) -> None:
    """A strip of the nearest cases: thumbnail, diagnosis and distance under each."""
    side, gap = 20.0, 3.0
    per_row = max(1, int((width + gap) // (side + gap)))
    pdf.ln(3)
    pdf.set_font("Helvetica", "B", 11)
    pdf.cell(width, 6, SIMILAR_TITLE, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    for line in (similar_caveat(cases), knn_vote_text(cases, result)):
        if line:
            pdf.multi_cell(width, 4.5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    for start in range(0, cases.k, per_row):
        if pdf.get_y() + side + 9 > pdf.h - pdf.b_margin:
            pdf.add_page()
        top = pdf.get_y() + 1
        chunk = list(zip(cases.neighbours, pictures, strict=True))[start : start + per_row]
        for i, (case, picture) in enumerate(chunk):
            x = pdf.l_margin + i * (side + gap)
            if picture:
                pdf.image(_rgb(picture), x=x, y=top, w=side, h=side, keep_aspect_ratio=True)
            else:
                pdf.rect(x, top, side, side)
            pdf.set_xy(x, top + side + 0.5)
            pdf.set_font("Helvetica", "B", 7)
            pdf.cell(side, 3.5, _latin1(case.label))
            pdf.set_xy(x, top + side + 4)
            pdf.set_font("Helvetica", "", 7)
            pdf.cell(side, 3.5, f"d = {case.distance:.3f}")
        pdf.set_xy(pdf.l_margin, top + side + 9)
