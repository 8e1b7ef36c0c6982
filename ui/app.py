"""DermaNet dashboard: `streamlit run ui/app.py`.

Layout and widgets only. It talks to the Serve HTTP API (`$DERMANET_SERVE_URL` or the sidebar)
through `dermanet.ui`, which also keeps the uploads, the gallery state and the case reports.
"""

from __future__ import annotations

import functools
import html
import math

import streamlit as st

from dermanet.classes import CLASS_DESCRIPTIONS, CLASS_NAMES, MALIGNANT_CLASSES
from dermanet.ui.cases import case_thumbnails
from dermanet.ui.client import ModelListing, ServeClient, ServeError, default_serve_url
from dermanet.ui.gallery import DashboardState
from dermanet.ui.report import (
    CaseReport,
    ReportUnavailable,
    build_case_report,
    render_html,
    render_pdf,
    report_filename,
)
from dermanet.ui.storage import ALLOWED_EXTENSIONS, UploadStore
from dermanet.ui.views import (
    CSS,
    MODE_LABELS,
    SIMILAR_TITLE,
    VOTE_COLUMN,
    RiskScale,
    card_light_html,
    class_label,
    knn_vote_text,
    model_label,
    model_summary,
    model_trust_lines,
    notice_html,
    probabilities_title,
    probability_rows,
    refusal_html,
    risk_score_html,
    server_problem,
    similar_cases_html,
    top_class_html,
    traffic_light_html,
)

GALLERY_COLUMNS = 5
st.set_page_config(page_title="DermaNet", page_icon="🔬", layout="wide")
st.markdown(CSS, unsafe_allow_html=True)

if "dn" not in st.session_state:
    st.session_state.dn = DashboardState()
state: DashboardState = st.session_state.dn
store = UploadStore()

# --- sidebar: page, server, checkpoint, Grad-CAM ----------------------------------------------
with st.sidebar:
    st.title("DermaNet")
    st.caption("Dermoscopic lesion classifier · research tool")
    page = st.radio("Page", ["Dashboard", "About"], key="page", horizontal=True)
    url = st.text_input("Server URL", value=default_serve_url(), key="serve_url")

listing: ModelListing | None = None
problem = problem_md = ""
try:
    client = ServeClient(url)
    listing = client.models()
except ServeError as exc:
    client = None
    problem = str(exc)
    problem_md = server_problem(exc)

model_id: str | None = None
with st.sidebar:
    if listing is not None and listing.usable_ids:
        ids = listing.usable_ids
        model_id = st.selectbox(
            "Checkpoint",
            ids,
            index=ids.index(listing.default) if listing.default in ids else 0,
            format_func=lambda m: model_label(m, listing.default),
            key="model",
        )
        st.caption(model_summary(listing.info(model_id)))
        for line in model_trust_lines(listing.info(model_id)):
            st.caption(line)
        for bad in listing.unusable:
            st.caption(f"⚠ {bad['id']} is not usable: {bad.get('error')}")
    else:
        st.caption("No server connection: checkpoints appear here once it answers.")
    show_cam = st.toggle("Grad-CAM", key="gradcam", help="Where the model looked")
    st.divider()
    st.caption(f"Uploads are kept in `{store.root}` (up to {store.max_bytes / 2**20:.0f} MB each).")

st.markdown(notice_html(), unsafe_allow_html=True)


# --- About ------------------------------------------------------------------------------------
def about_page() -> None:
    st.header("About DermaNet")
    st.markdown(
        "DermaNet classifies dermoscopic images into the eight ISIC 2019 classes with "
        "**DermResNetSE** (a ResNet with squeeze-and-excitation blocks and GeM pooling) served "
        "by Ray Serve. The dashboard shows, per image, the class probabilities, a risk score "
        "with a traffic light, and Grad-CAM maps of where the network looked.\n\n"
        "**It is a research tool, not a diagnosis.** Its output has not been validated for "
        "clinical use and must never replace examination by a qualified clinician."
    )
    st.subheader("Classes")
    st.dataframe(
        [
            {"Class": c, "Name": CLASS_DESCRIPTIONS[c], "Malignant": c in MALIGNANT_CLASSES}
            for c in CLASS_NAMES
        ],
        hide_index=True,
    )
    st.subheader("Risk and traffic light")
    if listing is not None and listing.risk_policy.get("weights"):
        policy = listing.risk_policy
        terms = " + ".join(f"{w:g}·P({c})" for c, w in policy["weights"].items())
        st.markdown(
            f"The server computes `risk = {terms}`. Traffic light: "
            f"{traffic_light_html('green')} below {policy['green_below']}, "
            f"{traffic_light_html('yellow')} below {policy['yellow_below']}, "
            f"{traffic_light_html('red')} otherwise. The risk is a score, not a probability: "
            "it runs from 0 to the largest weight (the probabilities sum to 1), and the "
            "dashboard shows it on that scale with a marker.",
            unsafe_allow_html=True,
        )
    else:
        st.caption(f"The server's risk policy is shown once it answers ({problem}).")
    st.subheader("When DermaNet does not answer")
    st.markdown(
        "Each image first passes the server's **gate**: quality checks (size, blank, blur, "
        "exposure, screens and documents) and, when the model file has the statistics, an "
        "out-of-distribution score on the model's own features. A refused image gets a "
        f"{traffic_light_html('unknown')} light and the reason instead of a risk level; its "
        "probabilities are still listed, marked as unreliable. For an accepted image, "
        "*plausible classes* is a conformal prediction set: the classes that contain the true "
        "one with the stated probability (e.g. 90 %) on images like the calibration ones.",
        unsafe_allow_html=True,
    )
    if listing is not None and model_id:
        st.subheader(f"Checkpoint `{model_id}`")
        st.json(listing.info(model_id), expanded=False)
    st.subheader("Data and licences")
    st.markdown(
        "Trained on ISIC 2019 / HAM10000 images (CC BY-NC 4.0; ISIC archive images CC BY-NC or "
        "CC-0 per image). Uploaded images stay on this computer, in the uploads folder."
    )


if page == "About":
    about_page()
    st.stop()

# --- Dashboard ----------------------------------------------------------------------------------
st.title("Lesion dashboard")
if listing is None or client is None:
    st.error(problem_md, icon=":material/cloud_off:")
    st.stop()
if model_id is None:
    reasons = "; ".join(f"{m['id']}: {m.get('error')}" for m in listing.unusable)
    st.error(f"The server has no usable checkpoint. {reasons}")
    st.stop()

for message in state.flash:
    st.warning(message)
state.flash.clear()

uploads = st.file_uploader(
    "Add dermoscopic images",
    type=[ext.lstrip(".") for ext in ALLOWED_EXTENSIONS],
    accept_multiple_files=True,
    key=f"uploader-{state.uploader_round}",
    help="JPEG or PNG; several at once. They are stored under generated names.",
    max_upload_size=max(1, math.ceil(store.max_bytes / 2**20)),
)
if uploads:
    outcome = state.add_uploads(store, [(f.file_id, f.name, f.getvalue()) for f in uploads])
    state.flash.extend(outcome.rejected)
    state.uploader_round += 1  # a fresh, empty uploader: the gallery now shows the images
    st.rerun()

images = store.list()
if not images:
    st.info(
        "Upload one or more dermoscopic images (JPEG or PNG) to classify them. Each appears "
        "in the gallery with its traffic light; click **View** to inspect it."
    )
    st.stop()

try:
    with st.spinner(f"Classifying with {model_id}…"):
        state.classify_missing(client, store, images, model_id)
except ServeError as exc:
    st.error(server_problem(exc), icon=":material/cloud_off:")
    st.stop()

current = state.current(images)
assert current is not None
result = state.prediction(current.image_id, model_id)

st.subheader(current.original_name)
cam_request = None
if show_cam and result is not None:  # the Grad-CAM display settings, above the image
    c_mode, c_opacity, c_class, _ = st.columns([3, 2, 3, 2], vertical_alignment="bottom")
    mode = (
        c_mode.segmented_control(
            "Display",
            list(MODE_LABELS),
            default="overlay",
            format_func=MODE_LABELS.get,
            key="cam_mode",
        )
        or "overlay"
    )
    opacity = c_opacity.slider(
        "Opacity", 0.0, 1.0, 0.5, 0.05, key="cam_opacity", disabled=mode == "heatmap"
    )
    target = c_class.selectbox(
        "Class",
        [None, *CLASS_NAMES],
        format_func=lambda c: class_label(c, result.top_class),
        key="cam_class",
    )
    cam_request = (target, mode, opacity)

similar = None  # the nearest confirmed training cases (POST /v1/similar)
similar_problem = ""
if result is not None:
    try:
        with st.spinner("Finding similar confirmed cases…"):
            similar = state.similar_cases(client, store, current, model_id)
        similar_problem = state.similar_error(current.image_id, model_id) or ""
    except ServeError as exc:
        similar_problem = server_problem(exc)

viewer, panel = st.columns([3, 2], gap="large")
cam = None
with viewer:
    if cam_request is not None:
        target, mode, opacity = cam_request
        try:
            cam = state.gradcam(client, store, current, model_id, target, mode, opacity)
            st.image(
                cam.png,
                caption=f"Grad-CAM · {cam.target_class} "
                f"({cam.target_probability:.1%}) · {MODE_LABELS[mode]}",
                width="stretch",
            )
        except ServeError as exc:
            st.error(f"Grad-CAM failed: {exc}")
    else:
        st.image(store.read(current.image_id), width="stretch")
    st.caption(
        f"{current.width}×{current.height} px · {current.image_format} · "
        f"uploaded {current.uploaded_at.replace('T', ' ')[:16]} UTC"
    )

with panel:
    if result is None:
        st.error(state.error(current.image_id, model_id) or "No prediction for this image.")
    else:
        st.markdown(
            traffic_light_html(result.traffic_light, result.risk, big=True),
            unsafe_allow_html=True,
        )
        if result.refused:  # in place of a risk level: why the gate refused the image
            st.markdown(refusal_html(result), unsafe_allow_html=True)
        st.markdown(top_class_html(result), unsafe_allow_html=True)  # with the plausible set
        scale = RiskScale.from_policy(listing.risk_policy)
        st.markdown(risk_score_html(result, scale), unsafe_allow_html=True)
        with st.expander(probabilities_title(result)):
            st.dataframe(
                probability_rows(result, similar),  # with the nearest cases' vote beside it
                hide_index=True,
                column_config={
                    "Probability": st.column_config.ProgressColumn(
                        "Probability", format="percent", min_value=0.0, max_value=1.0
                    ),
                    VOTE_COLUMN: st.column_config.ProgressColumn(
                        f"{VOTE_COLUMN} (k={similar.k})" if similar else VOTE_COLUMN,
                        format="percent",
                        min_value=0.0,
                        max_value=1.0,
                        help="Class-balanced vote of the nearest confirmed training cases",
                    ),
                },
            )
        st.caption(f"Model `{result.model_id}`")

        report = functools.partial(  # built only when a download button is clicked
            build_case_report, url, store, current, result, listing, cam, similar
        )

        def html_bytes(report=report) -> bytes:
            return render_html(report()).encode("utf-8")

        def pdf_bytes(report=report) -> bytes:
            try:
                return render_pdf(report())
            except ReportUnavailable as exc:
                return str(exc).encode()

        stamp = CaseReport(current.original_name, b"", current.mime, result)
        st.markdown("**Case report**")
        d_html, d_pdf = st.columns(2)
        d_html.download_button(
            "HTML",
            html_bytes,
            file_name=report_filename(stamp, "html"),
            mime="text/html",
            on_click="ignore",
            icon=":material/download:",
            key="report_html",
            width="stretch",
        )
        d_pdf.download_button(
            "PDF",
            pdf_bytes,
            file_name=report_filename(stamp, "pdf"),
            mime="application/pdf",
            on_click="ignore",
            icon=":material/picture_as_pdf:",
            key="report_pdf",
            width="stretch",
        )


# --- similar confirmed cases, under the prediction ---------------------------------------------
if result is not None:
    st.subheader(SIMILAR_TITLE)
    if similar is not None:
        st.markdown(knn_vote_text(similar, result))
        st.markdown(
            similar_cases_html(similar, case_thumbnails(similar.neighbours)),
            unsafe_allow_html=True,
        )
        st.caption(
            "The training images nearest to this one by the model's features (distance = "
            "1 − cosine similarity), with their confirmed diagnoses; the vote weighs each "
            "class by its share of the training images."
        )
    elif similar_problem:
        st.info(similar_problem, icon=":material/search_off:")


# --- gallery ------------------------------------------------------------------------------------
def remove(image_id: str) -> None:
    state.remove(store, image_id)


st.subheader(f"Gallery · {len(images)} image{'s' if len(images) != 1 else ''}")
for start in range(0, len(images), GALLERY_COLUMNS):
    columns = st.columns(GALLERY_COLUMNS)
    for column, image in zip(columns, images[start : start + GALLERY_COLUMNS], strict=False):
        answer = state.prediction(image.image_id, model_id)
        selected = image.image_id == current.image_id
        with column.container(border=True, key=f"card-{image.image_id}"):
            st.image(store.thumbnail(image.image_id), width="stretch")
            st.markdown(
                f'<div class="dn-card-name" title="{html.escape(image.original_name)}">'
                f"{html.escape(image.original_name)}</div>" + card_light_html(answer),
                unsafe_allow_html=True,
            )
            b_view, b_remove = st.columns([3, 1])
            b_view.button(
                "Viewing" if selected else "View",
                key=f"view-{image.image_id}",
                type="primary" if selected else "secondary",
                on_click=state.select,
                args=(image.image_id,),
                width="stretch",
            )
            b_remove.button(
                "",
                icon=":material/delete:",
                key=f"remove-{image.image_id}",
                help=f"Remove {image.original_name}",
                on_click=remove,
                args=(image.image_id,),
                width="stretch",
            )
