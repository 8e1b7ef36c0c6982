"""DermaNet dashboard: `streamlit run ui/app.py`.

Layout and widgets only. Users sign in with their account name and API key; the server checks
the key (`GET /v1/me`) and the dashboard keeps it in this browser session's memory only, sending
it as `Authorization: Bearer` on every request. Pages: Cases (the case list and a case's
visits with their stored answers, diagnosis, uploads), Single image (upload, gallery,
Grad-CAM, similar cases, report), Audit (admins only) and About. The server is
`$DERMANET_SERVE_URL` (configuration, not a field users can change); `dermanet.ui` holds the
client, the records, the uploads, the gallery state and the reports.
"""

from __future__ import annotations

import datetime as dt
import functools
import html
import math

import altair as alt
import pandas as pd
import streamlit as st

from dermanet.classes import CLASS_DESCRIPTIONS, CLASS_NAMES, MALIGNANT_CLASSES
from dermanet.ui.casebook import (
    AUDIT_SPANS,
    DIAGNOSIS_METHODS,
    GONE,
    IMAGE_GONE,
    Account,
    CaseDetail,
    CaseImage,
    CaseList,
    CaseSummary,
    SignInFailed,
    audit_rows,
    check_account,
    sign_in_problem,
    when,
)
from dermanet.ui.cases import case_thumbnails
from dermanet.ui.client import (
    ModelListing,
    NotSignedIn,
    ServeClient,
    ServeError,
    default_serve_url,
)
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
    LIGHT_COLOURS,
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
    refusal_text,
    risk_score_html,
    server_problem,
    similar_cases_html,
    top_class_html,
    traffic_light_html,
)

GALLERY_COLUMNS = 5
CASE_COLUMNS = 4
IMAGE_TYPES = [ext.lstrip(".") for ext in ALLOWED_EXTENSIONS]
SERVE_URL = default_serve_url()  # from configuration only: users cannot point it elsewhere
SIGNED_OUT = "The server no longer accepts your key (revoked?): sign in again."
st.set_page_config(page_title="DermaNet", page_icon="🔬", layout="wide")
st.markdown(CSS, unsafe_allow_html=True)


# --- signing in and out -------------------------------------------------------------------------
def sign_out(message: str = "") -> None:
    """Forget everything of this session (key, account, pages' state); `message` is shown on
    the sign-in page."""
    for key in list(st.session_state):
        del st.session_state[key]
    if message:
        st.session_state.signin_message = message


def sign_in_page() -> None:
    st.title("DermaNet")
    st.markdown(notice_html(), unsafe_allow_html=True)
    if message := st.session_state.pop("signin_message", ""):
        st.warning(message, icon=":material/lock:")
    with st.form("signin"):
        st.subheader("Sign in")
        name = st.text_input("Account name", key="signin_name")
        key = st.text_input("API key", type="password", key="signin_key")
        submitted = st.form_submit_button("Sign in", type="primary")
    st.caption(
        f"Server: {SERVE_URL}. Your administrator creates your account and gives you its key "
        "(`python -m dermanet.accounts add NAME`)."
    )
    if not submitted:
        return
    if not name.strip() or not key.strip():
        st.error("Enter your account name and your API key.")
        return
    client = ServeClient(SERVE_URL, api_key=key.strip())
    try:
        account = check_account(name, client.me())
    except SignInFailed as exc:
        st.error(str(exc))
        return
    except ServeError as exc:
        st.error(sign_in_problem(exc) if exc.status else server_problem(exc))
        return
    st.session_state.account = account
    st.session_state.client = client  # holds the key: in this session's memory only
    st.rerun()


def problem(exc: ServeError) -> str:
    """What to show for a failed request; a refused key (401) signs out instead."""
    if isinstance(exc, NotSignedIn):
        raise exc
    return server_problem(exc) if exc.status is None else str(exc)


def flash(kind: str, text: str) -> None:
    """A message for the next run (after st.rerun)."""
    st.session_state.setdefault("flash", []).append((kind, text))


def show_flash() -> None:
    for kind, text in st.session_state.pop("flash", []):
        {"success": st.success, "warning": st.warning}.get(kind, st.info)(text)


# --- Cases --------------------------------------------------------------------------------------
def open_case(case_id: str | None) -> None:
    st.session_state.case_id = case_id


def cases_page(account: Account, client: ServeClient, scale: RiskScale | None) -> None:
    if st.session_state.get("case_id"):
        case_page(account, client, scale, st.session_state.case_id)
        return
    st.title("Cases")
    show_flash()
    with st.expander("New case", icon=":material/add:"), st.form("new_case", clear_on_submit=True):
        c_patient, c_lesion, c_site = st.columns(3)
        patient = c_patient.text_input(
            "Patient pseudonym", max_chars=64, help="A pseudonym, never a name"
        )
        lesion = c_lesion.text_input("Lesion", max_chars=64, placeholder="e.g. L1")
        site = c_site.text_input("Body site (optional)", max_chars=64)
        if st.form_submit_button("Create case", type="primary"):
            try:
                created = CaseSummary.from_json(client.create_case(patient, lesion, site))
            except ServeError as exc:
                st.error(problem(exc))  # e.g. 409: that lesion has a case, named here
            else:
                open_case(created.case_id)
                flash("success", f"Case created: {created.title}.")
                st.rerun()
    search = st.text_input(
        "Search by patient pseudonym", key="case_search", placeholder="e.g. P-0012"
    )
    try:
        found = CaseList.from_json(client.cases(search))
    except ServeError as exc:
        st.error(problem(exc), icon=":material/cloud_off:")
        return
    if not found.cases:
        st.info(
            f"No case of a patient matching “{search.strip()}”."
            if search.strip()
            else "No cases yet: create one with **New case** above."
        )
        return
    shown = len(found.cases)
    st.caption(
        f"{found.total} case{'s' if found.total != 1 else ''}, most recent activity first"
        + (f" (the first {shown}; narrow the search)" if shown < found.total else "")
    )
    for case in found.cases:
        with st.container(border=True, key=f"case-{case.case_id}"):
            c_text, c_light, c_open = st.columns([6, 3, 1], vertical_alignment="center")
            diagnosis = f" · diagnosis **{case.diagnosis}**" if case.diagnosis else ""
            c_text.markdown(
                f"**{html.escape(case.title)}**  \n"
                f"{case.image_count} image{'s' if case.image_count != 1 else ''} · last taken "
                f"{when(case.last_taken_at, with_time=False)} · created by "
                f"{html.escape(case.created_by)}{diagnosis}"
            )
            if case.image_count:
                c_light.markdown(
                    traffic_light_html(case.latest_traffic_light, case.latest_risk),
                    unsafe_allow_html=True,
                )
            c_open.button(
                "Open",
                key=f"open-{case.case_id}",
                on_click=open_case,
                args=(case.case_id,),
                width="stretch",
            )


def risk_chart(rows: list[dict], scale: RiskScale | None) -> alt.LayerChart | alt.Chart:
    """The risk score per visit on the policy's scale, its points in their light's colour and
    the two thresholds as dashed lines."""
    frame = pd.DataFrame(rows)
    top = scale.top if scale else max(1.0, float(frame["Risk score"].max()))
    lights = list(LIGHT_COLOURS)
    colour = alt.Color(
        "Light:N",
        scale=alt.Scale(domain=lights, range=[LIGHT_COLOURS[k] for k in lights]),
        legend=None,
    )
    base = alt.Chart(frame).encode(
        x=alt.X("Taken:T", title="Taken"),
        y=alt.Y("Risk score:Q", scale=alt.Scale(domain=[0, top]), title="Risk score"),
        tooltip=["Taken:T", alt.Tooltip("Risk score:Q", format=".2f"), "Image:N"],
    )
    chart = base.mark_line(color="#6b7280") + base.mark_circle(size=90).encode(color=colour)
    if scale is not None:
        limits = pd.DataFrame({"y": [scale.green_below, scale.yellow_below]})
        chart += alt.Chart(limits).mark_rule(strokeDash=[4, 4], color="#9ca3af").encode(y="y:Q")
    return chart.properties(height=220)


def case_picture(client: ServeClient, case_id: str, image_id: str) -> bytes | None:
    """A stored image's bytes, kept in this session (an image never changes); None when it
    was deleted meanwhile."""
    cache = st.session_state.setdefault("case_pictures", {})
    if (case_id, image_id) not in cache:
        try:
            data = client.image_file(case_id, image_id)
        except ServeError as exc:
            if exc.status != 404:
                raise
            return None
        if len(cache) >= 64:
            cache.clear()
        cache[(case_id, image_id)] = data
    return cache[(case_id, image_id)]


def visit_card(
    account: Account, client: ServeClient, case_id: str, image: CaseImage, scale: RiskScale | None
) -> None:
    """One visit: the image, its STORED answer (light, score, top class), model and uploader."""
    answer = image.answer
    data = case_picture(client, case_id, image.image_id)
    if data is None:
        st.info(IMAGE_GONE)
    else:
        st.image(data, width="stretch")
    st.markdown(
        f"**{when(image.taken_at, with_time=False)}** · {html.escape(image.filename)}<br>"
        + traffic_light_html(answer.traffic_light, answer.risk, note=refusal_text(answer)),
        unsafe_allow_html=True,
    )
    st.markdown(refusal_html(answer) or risk_score_html(answer, scale), unsafe_allow_html=True)
    st.markdown(top_class_html(answer), unsafe_allow_html=True)
    st.caption(
        f"{image.model_text} · uploaded by {image.uploaded_by} on {when(image.uploaded_at)} UTC"
    )
    if account.may_delete(image.uploaded_by) and st.button(
        "Delete image",
        key=f"delete-{image.image_id}",
        icon=":material/delete:",
        help="Hide this image from the case (kept in the audit trail)",
    ):
        try:
            client.delete_image(case_id, image.image_id)
        except ServeError as exc:
            flash("warning", IMAGE_GONE if exc.status == 404 else problem(exc))
        else:
            flash("success", f"Image {image.filename or image.image_id} deleted.")
        st.rerun()


def delete_case_button(client: ServeClient, summary: CaseSummary) -> None:
    """Soft delete of the whole case (its creator or an admin), behind a confirmation."""
    with st.popover("Delete case", icon=":material/delete:"):
        st.markdown("Hide this case and its images from every user? The audit trail keeps it.")
        if not st.button("Delete case", key="delete_case", type="primary"):
            return
        try:
            client.delete_case(summary.case_id)
        except ServeError as exc:
            if exc.status != 404:  # 404: someone deleted it already; back to the list anyway
                st.error(problem(exc))
                return
        open_case(None)
        flash("success", f"Case deleted: {summary.title}.")
        st.rerun()


def case_page(account: Account, client: ServeClient, scale: RiskScale | None, case_id: str) -> None:
    st.button(
        "All cases", key="back", icon=":material/arrow_back:", on_click=open_case, args=(None,)
    )
    try:
        case = CaseDetail.from_json(client.case(case_id))
    except ServeError as exc:
        if exc.status == 404:
            st.info(GONE, icon=":material/folder_off:")
        else:
            st.error(problem(exc), icon=":material/cloud_off:")
        return
    summary = case.summary
    st.title(summary.title)
    st.caption(
        f"Case `{summary.case_id}` · created by {summary.created_by} on "
        f"{when(summary.created_at)} UTC · {len(case.images)} "
        f"image{'s' if len(case.images) != 1 else ''}"
    )
    show_flash()
    if account.may_delete(summary.created_by):
        delete_case_button(client, summary)
    if case.diagnoses:
        latest = case.diagnoses[-1]
        st.success(f"Confirmed diagnosis: {latest.text()}", icon=":material/verified:")

    rows = case.risk_rows()
    if len(rows) >= 2:
        st.subheader("Risk score per visit")
        st.altair_chart(risk_chart(rows, scale), width="stretch")
    if case.images:
        st.subheader("Visits")
        for start in range(0, len(case.images), CASE_COLUMNS):
            columns = st.columns(CASE_COLUMNS)
            for column, image in zip(
                columns, case.images[start : start + CASE_COLUMNS], strict=False
            ):
                with column.container(border=True, key=f"visit-{image.image_id}"):
                    visit_card(account, client, case_id, image, scale)
    else:
        st.info("No images yet: add the first one below.")

    c_add, c_diagnosis = st.columns(2, gap="large")
    with c_add, st.form("add_image", clear_on_submit=True):
        st.subheader("Add an image")
        upload = st.file_uploader("Dermoscopic image", type=IMAGE_TYPES, key="case_upload")
        today = dt.datetime.now(dt.UTC).date()
        taken = st.date_input("Taken on", value=today, max_value=today, key="case_taken")
        if st.form_submit_button("Upload and classify", type="primary"):
            if upload is None:
                st.error("Choose an image first.")
            else:
                try:
                    added = client.add_image(
                        case_id, upload.name, upload.getvalue(), taken.isoformat()
                    )
                except ServeError as exc:
                    st.error(GONE if exc.status == 404 else problem(exc))
                else:
                    light = added.get("traffic_light", "unknown")
                    flash("success", f"{upload.name} added ({light} light).")
                    st.rerun()
    with c_diagnosis, st.form("diagnosis", clear_on_submit=True):
        st.subheader("Confirmed diagnosis")
        for earlier in case.diagnoses:
            st.markdown(f"- {html.escape(earlier.text())}" + (
                f": {html.escape(earlier.note)}" if earlier.note else ""))  # fmt: skip
        label = st.selectbox(
            "Diagnosis",
            CLASS_NAMES,
            format_func=lambda c: f"{c} · {CLASS_DESCRIPTIONS[c]}",
            key="dx_label",
        )
        method = st.selectbox(
            "Confirmed by", list(DIAGNOSIS_METHODS), format_func=DIAGNOSIS_METHODS.get,
            key="dx_method",
        )  # fmt: skip
        note = st.text_area("Note", max_chars=2000, key="dx_note")
        if st.form_submit_button("Record diagnosis", type="primary"):
            try:
                client.add_diagnosis(case_id, label, method, note)
            except ServeError as exc:
                st.error(GONE if exc.status == 404 else problem(exc))
            else:
                flash("success", f"Diagnosis {label} recorded.")
                st.rerun()


# --- Audit (admins) -----------------------------------------------------------------------------
def audit_page(client: ServeClient) -> None:
    st.title("Audit log")
    span = st.selectbox("Events of", list(AUDIT_SPANS), format_func=AUDIT_SPANS.get, key="audit")
    try:
        rows = audit_rows(client.audit(span or None))
    except ServeError as exc:
        st.error(
            "Only administrators can read the audit log." if exc.status == 403 else problem(exc)
        )
        return
    st.caption(f"{len(rows)} event{'s' if len(rows) != 1 else ''}, newest first")
    st.dataframe(rows, hide_index=True, width="stretch")


# --- Single image -------------------------------------------------------------------------------
def checkpoint_sidebar(listing: ModelListing, store: UploadStore) -> tuple[str | None, bool]:
    """The sidebar's checkpoint picker (with what the checkpoint checks) and Grad-CAM toggle:
    (checkpoint, Grad-CAM on)."""
    model_id: str | None = None
    with st.sidebar:
        st.divider()
        if listing.usable_ids:
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
        show_cam = st.toggle("Grad-CAM", key="gradcam", help="Where the model looked")
        st.caption(
            f"Uploads are kept in `{store.root}` (up to {store.max_bytes / 2**20:.0f} MB each)."
        )
    return model_id, show_cam


def single_image_page(
    account: Account, client: ServeClient, listing: ModelListing | None, problem_text: str
) -> None:
    """Upload, gallery, Grad-CAM, similar cases and report of images outside any case."""
    if "dn" not in st.session_state:
        st.session_state.dn = DashboardState()
    state: DashboardState = st.session_state.dn
    store = UploadStore().for_account(account.name)
    st.title("Single image")
    if listing is None:
        st.error(problem_text, icon=":material/cloud_off:")
        st.stop()
    model_id, show_cam = checkpoint_sidebar(listing, store)
    if model_id is None:
        reasons = "; ".join(f"{m['id']}: {m.get('error')}" for m in listing.unusable)
        st.error(f"The server has no usable checkpoint. {reasons}")
        st.stop()

    for message in state.flash:
        st.warning(message)
    state.flash.clear()

    uploads = st.file_uploader(
        "Add dermoscopic images",
        type=IMAGE_TYPES,
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
        st.error(problem(exc), icon=":material/cloud_off:")
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
            similar_problem = problem(exc)

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
                build_case_report, client, store, current, result, listing, cam, similar
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
            formats = (
                ("html", html_bytes, "text/html", ":material/download:"),
                ("pdf", pdf_bytes, "application/pdf", ":material/picture_as_pdf:"),
            )
            for column, (ext, data, mime, icon) in zip(st.columns(2), formats, strict=True):
                column.download_button(
                    ext.upper(), data, file_name=report_filename(stamp, ext), mime=mime,
                    on_click="ignore", icon=icon, key=f"report_{ext}", width="stretch",
                )  # fmt: skip

    # --- similar confirmed cases, under the prediction -----------------------------------------
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

    # --- gallery --------------------------------------------------------------------------------
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


# --- About ------------------------------------------------------------------------------------
def about_page(listing: ModelListing | None, problem_text: str) -> None:
    st.header("About DermaNet")
    st.markdown(
        "DermaNet classifies dermoscopic images into the eight ISIC 2019 classes with "
        "**DermResNetSE** (a ResNet with squeeze-and-excitation blocks and GeM pooling) served "
        "by Ray Serve. The dashboard keeps cases (a patient's lesion over time, each visit "
        "with the answer given when it was uploaded, and the confirmed diagnosis) and shows, "
        "per image, the class probabilities, a risk score with a traffic light, and Grad-CAM "
        "maps of where the network looked.\n\n"
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
        st.caption(f"The server's risk policy is shown once it answers ({problem_text}).")
    st.subheader("When DermaNet does not answer")
    st.markdown(
        "Each image first passes the server's **gate**: quality checks (size, blank, blur, "
        "exposure, screens and documents) and, when the model file has the statistics, an "
        "out-of-distribution score on the model's own features; an image that score refuses is "
        "looked at once more with its hair and ink marks painted out. A refused image gets a "
        f"{traffic_light_html('unknown')} light and the reason instead of a risk level; its "
        "probabilities are still listed, marked as unreliable. For an accepted image, "
        "*plausible classes* is a conformal prediction set: the classes that contain the true "
        "one with the stated probability (e.g. 90 %) on images like the calibration ones.",
        unsafe_allow_html=True,
    )
    model_id = st.session_state.get("model") or (listing.default if listing else None)
    if listing is not None and model_id:
        st.subheader(f"Checkpoint `{model_id}`")
        st.json(listing.info(model_id), expanded=False)
    st.subheader("Data and licences")
    st.markdown(
        "Trained on ISIC 2019 / HAM10000 images (CC BY-NC 4.0; ISIC archive images CC BY-NC or "
        "CC-0 per image). Case images and their answers are kept by the DermaNet server; "
        "single-image uploads stay on the dashboard's computer, in its uploads folder."
    )


# --- the page -----------------------------------------------------------------------------------
def main(account: Account, client: ServeClient) -> None:
    """Sidebar (who is signed in, sign-out, pages) and the chosen page."""
    admin = account.is_admin
    with st.sidebar:
        st.title("DermaNet")
        st.caption("Dermoscopic lesion classifier · research tool")
        st.markdown(f"Signed in as **{html.escape(account.name)}** ({account.role})")
        st.button("Sign out", key="sign_out", icon=":material/logout:", on_click=sign_out)
        pages = ["Cases", "Single image", *(["Audit"] if admin else []), "About"]
        page = st.radio("Page", pages, key="page")
        st.caption(f"Server: {SERVE_URL}")
    st.markdown(notice_html(), unsafe_allow_html=True)
    listing: ModelListing | None = None
    problem_text = ""
    try:
        listing = client.models()
    except ServeError as exc:
        problem_text = problem(exc)
    scale = RiskScale.from_policy(listing.risk_policy) if listing else None
    if page == "Cases":
        cases_page(account, client, scale)
    elif page == "Single image":
        single_image_page(account, client, listing, problem_text)
    elif page == "Audit" and admin:
        audit_page(client)
    else:
        about_page(listing, problem_text)


if "account" not in st.session_state or "client" not in st.session_state:
    sign_in_page()
    st.stop()
try:
    main(st.session_state.account, st.session_state.client)
except NotSignedIn:  # any request's 401: the key was revoked or the server forgot it
    sign_out(SIGNED_OUT)
    st.rerun()
