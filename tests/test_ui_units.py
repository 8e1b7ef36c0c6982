"""dermanet.ui without a server: upload storage, the API client's errors, state, reports."""

from __future__ import annotations

import base64
import io
import json
import re
import zlib
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from dermanet.classes import CLASS_NAMES
from dermanet.ui.casebook import (
    Account,
    CaseDetail,
    CaseList,
    SignInFailed,
    audit_rows,
    check_account,
    sign_in_problem,
    when,
)
from dermanet.ui.cases import case_thumbnails, folder_thumbnail
from dermanet.ui.client import (
    Classification,
    NotSignedIn,
    ServeClient,
    ServeError,
    ServeUnavailable,
    SimilarCase,
    SimilarCases,
)
from dermanet.ui.gallery import DashboardState
from dermanet.ui.report import CaseReport, render_html, render_pdf, report_filename
from dermanet.ui.storage import UploadRejected, UploadStore, display_name
from dermanet.ui.views import (
    VOTE_COLUMN,
    RiskScale,
    card_light_html,
    knn_vote_text,
    model_trust_lines,
    probabilities_title,
    probability_rows,
    refusal_html,
    risk_score_html,
    risk_score_text,
    set_text,
    similar_cases_html,
    top_class_html,
    traffic_light_html,
)

pytestmark = pytest.mark.timeout(60)


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (40, 30), seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def answer(light: str = "red", model: str = "default", name: str = "a.jpg") -> dict:
    probs = dict.fromkeys(CLASS_NAMES, 0.02)
    probs["MEL"] = 0.86
    return {
        "model_id": model,
        "filename": name,
        "probabilities": probs,
        "top_class": "MEL",
        "top_probability": 0.86,
        "risk": 1.35,
        "traffic_light": light,
        "malignant": 1.0,
        "benign": 0.0,
    }


POLICY = {"weights": {"MEL": 1.5, "BCC": 1.3, "SCC": 1.0}, "green_below": 0.15, "yellow_below": 0.6}


def trusted_answer(name: str = "a.jpg") -> dict:
    """An accepted image from a model with trust statistics (as the server sends it)."""
    gate = {"accepted": True, "reasons": [], "ood_score": 0.8, "ood_threshold": 1.57}
    return answer("red", name=name) | {
        "probabilities_trusted": True,
        "gate": gate,
        "prediction_set": ["MEL", "NV", "BKL"],
        "set_coverage": 0.9,
    }


def refused_answer(name: str = "page.png") -> dict:
    """A screenshot refused by the gate: no risk claimed (nulls), probabilities kept."""
    reasons = [
        "looks like a screen, document or graphic: one flat colour covers 85% of its centre "
        "(at most 45%)",
        "unlike the training images (OOD score 71.5 > threshold 1.57) <b>",
    ]
    gate = {"accepted": False, "reasons": reasons, "ood_score": 71.5, "ood_threshold": 1.57}
    body = answer(name=name) | {key: None for key in ("risk", "malignant", "benign")}
    return body | {
        "traffic_light": "unknown",
        "probabilities_trusted": False,
        "gate": gate,
        "prediction_set": ["BCC", "MEL"],
        "set_coverage": 0.9,
    }


# --- storage ------------------------------------------------------------------------------------
def test_upload_store_generates_safe_names_and_sidecars(tmp_path) -> None:
    store = UploadStore(tmp_path / "up")
    kept = store.save("../../etc/pass\x00wd<script>.JPG", image_bytes())
    assert kept.original_name == "passwd<script>.JPG"  # no folders, no control characters
    assert kept.stored_name == f"{kept.image_id}.jpg" and len(kept.image_id) == 32
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == sorted(
        [kept.stored_name, f"{kept.image_id}.json", f"{kept.image_id}.thumb.jpg"]
    )
    # patients' images: readable by this user only, whatever the umask
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "up").iterdir()} == {0o600}
    assert json.loads((tmp_path / "up" / f"{kept.image_id}.json").read_text())["width"] == 40
    assert store.read(kept.image_id) == image_bytes()
    # a PNG named .jpg is stored as what it is
    png = store.save("x.jpg", image_bytes("PNG", seed=1))
    assert png.stored_name.endswith(".png") and png.mime == "image/png"
    assert {s.image_id for s in store.list()} == {png.image_id, kept.image_id}


@pytest.mark.parametrize(
    ("name", "data", "words"),
    [
        ("notes.txt", b"hello", "only .jpg"),
        ("a.gif", b"GIF89a", "only .jpg"),
        ("empty.png", b"", "empty"),
        ("fake.jpg", b"hello doctor" * 10, "not a readable"),
        ("big.png", b"\x89PNG" + b"\0" * 3000, "over the upload limit"),
        ("truncated.jpg", image_bytes(size=(200, 200))[:9000], "damaged"),
        ("bmp.png", None, "not JPEG or PNG"),
        ("huge.png", "huge", "megapixels"),
    ],
)
def test_upload_store_rejects_with_a_reason(tmp_path, name, data, words) -> None:
    if data is None:
        out = io.BytesIO()
        Image.new("RGB", (8, 8)).save(out, format="BMP")
        data = out.getvalue()
    elif data == "huge":
        out = io.BytesIO()
        Image.new("L", (3000, 2000)).save(out, format="PNG")
        data = out.getvalue()
    store = UploadStore(tmp_path, max_bytes=2048 if name == "big.png" else None, max_pixels=5e6)
    with pytest.raises(UploadRejected, match=words):
        store.save(name, data)
    assert store.list() == []


def test_upload_store_dedupes_removes_and_refuses_path_ids(tmp_path) -> None:
    store = UploadStore(tmp_path)
    first = store.save("a.jpg", image_bytes())
    assert store.save("again.jpg", image_bytes()) == first
    assert store.get("../../etc/passwd") is None and store.get(first.image_id) == first
    with pytest.raises(KeyError):
        store.read("../" + first.image_id)
    assert store.remove(first.image_id) and not store.remove(first.image_id)
    assert list(tmp_path.iterdir()) == []


def test_upload_limit_from_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DERMANET_UPLOAD_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("DERMANET_UPLOAD_MAX_MB", "0.5")
    store = UploadStore()
    assert store.root == (tmp_path / "env").resolve() and store.max_bytes == 512 * 1024
    monkeypatch.setenv("DERMANET_UPLOAD_MAX_MB", "lots")
    with pytest.raises(ValueError, match="DERMANET_UPLOAD_MAX_MB"):
        UploadStore()


def test_display_name_is_bounded() -> None:
    assert display_name("C:\\Users\\x\\" + "a" * 200 + ".jpeg").endswith("….jpeg")
    assert len(display_name("b" * 300 + ".png")) <= 80
    assert display_name("\x00\x01") == "image"


# --- client -------------------------------------------------------------------------------------
def mock_client(handler) -> ServeClient:
    return ServeClient("127.0.0.1:9/", transport=httpx.MockTransport(handler))


def test_client_unreachable_says_where_and_what_to_do() -> None:
    client = ServeClient("http://127.0.0.1:9", connect_timeout_s=1)
    with pytest.raises(ServeUnavailable, match=r"cannot reach .*127\.0\.0\.1:9.*make demo"):
        client.models()
    with pytest.raises(ServeError, match="http://"):
        ServeClient("ftp://example")


def test_client_maps_4xx_detail_and_batches_of_16() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/gradcam":
            return httpx.Response(422, json={"detail": "unknown class 'XYZ'"})
        n = request.content.count(b'name="file"')
        calls.append(n)
        if n == 1:
            return httpx.Response(200, json=answer())
        return httpx.Response(200, json={"results": [answer()] * n})

    client = mock_client(handler)
    assert client.base_url == "http://127.0.0.1:9"
    results = client.classify([(f"{i}.jpg", b"x") for i in range(20)], model="m")
    assert calls == [16, 4] and len(results) == 20 and results[0].traffic_light == "red"
    with pytest.raises(ServeError, match=r"\(422\): unknown class 'XYZ'") as info:
        client.gradcam("a.jpg", b"x", target_class="XYZ")
    assert info.value.status == 422


def test_client_not_dermanet() -> None:
    client = mock_client(lambda request: httpx.Response(200, text="<html>hello</html>"))
    with pytest.raises(ServeUnavailable, match="DermaNet server"):
        client.models()


# --- state --------------------------------------------------------------------------------------
def test_state_uploads_selection_and_per_image_fallback(tmp_path) -> None:
    store = UploadStore(tmp_path)
    state = DashboardState()
    outcome = state.add_uploads(
        store,
        [("f1", "a.jpg", image_bytes(seed=1)), ("f2", "b.txt", b"x"), ("f3", "c.png", b"no")],
    )
    assert len(outcome.stored) == 1 and len(outcome.rejected) == 2
    assert state.add_uploads(store, [("f1", "a.jpg", image_bytes(seed=1))]).stored == []
    good = store.save("d.jpg", image_bytes(seed=2))
    assert state.current(store.list()).image_id == state.selected

    def handler(request: httpx.Request) -> httpx.Response:
        if request.content.count(b'name="file"') > 1:
            return httpx.Response(422, json={"detail": "d.jpg: not an image"})
        if b"d.jpg" in request.content:
            return httpx.Response(422, json={"detail": "not an image"})
        return httpx.Response(200, json=answer())

    images = store.list()
    assert state.classify_missing(mock_client(handler), store, images, "default") == 2
    assert state.prediction(outcome.stored[0].image_id, "default").top_class == "MEL"
    assert "not an image" in state.error(good.image_id, "default")
    assert state.classify_missing(mock_client(handler), store, images, "default") == 0
    state.select(good.image_id)
    state.remove(store, good.image_id)
    assert state.selected is None and state.error(good.image_id, "default") is None
    assert state.current(store.list()).image_id == outcome.stored[0].image_id


# --- views and reports --------------------------------------------------------------------------
def test_views_use_the_servers_numbers() -> None:
    result = Classification.from_json(answer("yellow"))
    light = traffic_light_html(result.traffic_light, result.risk)
    assert "dn-light-yellow" in light and "1.35" in light and "Intermediate" in light
    rows = probability_rows(result)
    assert next(r["Class"] for r in rows) == "MEL" and len(rows) == len(CLASS_NAMES)


def test_risk_is_a_score_on_the_policys_scale_never_a_probability() -> None:
    """The server's risk 1.16 (1.5·P(MEL) + ...; clipped to 100 % "malignant") reads as a
    score on 0-1.5 with the light thresholds, the marker at 1.16 / 1.5 of the track."""
    result = Classification.from_json(answer() | {"risk": 1.16})
    scale = RiskScale.from_policy(POLICY)
    assert scale == RiskScale(top=1.5, green_below=0.15, yellow_below=0.6)
    assert risk_score_text(result, scale) == "Risk score 1.16 on 0–1.5; green < 0.15, red ≥ 0.6"
    score = risk_score_html(result, scale)
    assert 'data-risk="1.1600"' in score and "left:77.33%" in score
    assert [float(w) for w in re.findall(r"width:([\d.]+)%", score)] == [10.0, 30.0, 60.0]
    assert "100.0%" not in score and "alignant" not in score
    assert RiskScale.from_policy({}) is None and RiskScale.from_policy(None) is None
    assert risk_score_text(result) == "Risk score 1.16" and "dn-risk-marker" not in (
        risk_score_html(result)
    )
    above = Classification.from_json(answer() | {"risk": 2.0})  # clipped to the track's end
    assert "left:100.00%" in risk_score_html(above, scale)


def test_client_parses_the_trust_fields() -> None:
    refused = Classification.from_json(refused_answer())  # risk null: no float(None) crash
    assert refused.refused and not refused.accepted and refused.risk is None
    assert refused.malignant is None and refused.benign is None
    assert refused.traffic_light == "unknown" and not refused.probabilities_trusted
    assert refused.reasons[0].startswith("looks like a screen") and refused.ood_score == 71.5
    accepted = Classification.from_json(trusted_answer())
    assert accepted.accepted and accepted.prediction_set == ("MEL", "NV", "BKL")
    assert accepted.set_coverage == 0.9 and accepted.ood_threshold == 1.57
    old = Classification.from_json(answer())  # a server from before the gate
    assert old.accepted and old.prediction_set is None and old.probabilities_trusted
    assert old.to_dict()["risk"] == 1.35 and old.model is None
    version = {"id": "default", "sha256": "ab" * 32, "created": "2026-12-01T10:00:00+00:00"}
    versioned = Classification.from_json(trusted_answer() | {"model": version})
    assert versioned.model.sha256 == "ab" * 32 and versioned.to_dict()["model"] == version


def test_views_of_a_refused_image() -> None:
    result = Classification.from_json(refused_answer())
    light = traffic_light_html(result.traffic_light, result.risk, big=True)
    assert "dn-light-unknown" in light and "Not assessed" in light and "#9ca3af" in light
    assert "risk score" not in light
    message = refusal_html(result)
    assert "This does not look like a dermoscopic image" in message
    assert "one flat colour covers 85%" in message and "OOD score 71.5" in message
    assert "<b>)" not in message and "&lt;b&gt;" in message  # reasons are escaped
    score = risk_score_html(result, RiskScale.from_policy(POLICY))
    assert 'data-risk="not-assessed"' in score and "dn-risk-marker" not in score
    top = top_class_html(result)
    assert "unreliable" in top and "Plausible" not in top and set_text(result) == ""
    assert probabilities_title(result) == (
        "Probabilities of all classes (unreliable: the image was refused)"
    )
    card = card_light_html(result)
    assert "dn-light-unknown" in card and "This does not look like a dermoscopic" in card
    assert "Not classified" in card_light_html(None)


def test_views_of_an_accepted_image_show_the_plausible_classes() -> None:
    result = Classification.from_json(trusted_answer())
    assert set_text(result) == "Plausible classes (90 % set): MEL, NV, BKL"
    top = top_class_html(result)
    assert "Most likely: <b>Melanoma</b>" in top and 'data-set="MEL,NV,BKL"' in top
    assert "Plausible classes (90 % set): MEL, NV, BKL" in top
    assert refusal_html(result) == "" and 'data-risk="1.3500"' in risk_score_html(result)
    assert probabilities_title(result) == "Probabilities of all classes"
    assert set_text(Classification.from_json(answer())) == ""  # no sets: no line
    lines = model_trust_lines(
        {
            "gate": {"description": "quality checks + OOD score (mahalanobis_log, threshold 1.57)"},
            "prediction_sets": {"description": "split conformal (mondrian), 90 % coverage"},
        }
    )
    assert lines == [
        "Gate: quality checks + OOD score (mahalanobis_log, threshold 1.57)",
        "Prediction sets: split conformal (mondrian), 90 % coverage",
    ]
    assert model_trust_lines({}) == []


def pdf_streams(pdf: bytes, *, deflated_only: bool = False) -> list[bytes]:
    """Every stream of a PDF, inflated where fpdf2 deflated it; the others (a JPEG image) as
    they are, or left out with `deflated_only`.

    The end-of-line before `endstream` stays on the data and the decompressor ignores it: a
    deflated stream may itself end in a CR byte, which a pattern stripping an optional CR
    before the line break of `endstream` cut off (about 1 report in 12, depending on its date)."""
    streams = []
    for stream in re.findall(rb"stream\r?\n(.*?)endstream", pdf, flags=re.S):
        try:
            streams.append(zlib.decompressobj().decompress(stream))
        except zlib.error:  # a JPEG image (DCTDecode)
            if not deflated_only:
                streams.append(stream)
    return streams


def pdf_text(pdf: bytes) -> str:
    """The text drawn on a PDF's pages."""
    text = "".join(stream.decode("latin-1") for stream in pdf_streams(pdf))
    return text.replace("\\(", "(").replace("\\)", ")")


@pytest.mark.parametrize("kind", ["refused", "accepted"])
def test_case_report_says_what_the_dashboard_says(kind: str) -> None:
    body = refused_answer() if kind == "refused" else trusted_answer()
    report = CaseReport(
        image_name="page.png",
        image=image_bytes("PNG", size=(120, 90)),
        image_mime="image/png",
        result=Classification.from_json(body),
        risk_policy=POLICY,
    )
    page = render_html(report)
    text = pdf_text(render_pdf(report))
    if kind == "refused":
        assert "dn-light-unknown" in page and "This does not look like a dermoscopic" in page
        assert 'data-risk="not-assessed"' in page and 'class="dn-risk-marker"' not in page
        assert "(unreliable: the image was refused)" in page and "Plausible" not in page
        assert "This does not look like a dermoscopic image" in text and "Not assessed" in text
        assert "not assessed" in text and "unreliable" in text and "(risk score" not in text
    else:
        assert "Plausible classes (90 % set): MEL, NV, BKL" in page and "dn-light-red" in page
        assert "Plausible classes (90 % set): MEL, NV, BKL" in text
        assert "(risk score 1.35)" in text and "Risk score 1.35 on 0-1.5" in text
        assert "100.0%" not in text and "100.0%" not in page  # no risk as a probability
        assert "not assessed" not in text


def test_case_report_html_and_pdf(tmp_path) -> None:
    result = Classification.from_json(answer(name="<img src=x onerror=alert(1)>.jpg"))
    report = CaseReport(
        image_name="<img src=x onerror=alert(1)>.jpg",
        image=image_bytes(size=(120, 90)),
        image_mime="image/jpeg",
        result=result,
        gradcam_png=image_bytes("PNG", size=(120, 90)),
        gradcam_target="MEL",
        gradcam_mode="overlay",
        risk_policy={"weights": {"MEL": 1.5}, "green_below": 0.15, "yellow_below": 0.6},
    )
    page = render_html(report)
    assert "<img src=x" not in page and "&lt;img src=x" in page
    for words in ("Research software", "dn-light-red", "Melanoma", "86.00%", "default", "1.5·P"):
        assert words in page
    assert page.count("data:image/") == 2 and "http" not in page.split("<body>")[1]
    pdf = render_pdf(report)
    assert pdf.startswith(b"%PDF") and len(pdf) > 2000
    name = report_filename(report, "pdf")
    assert name.startswith("dermanet-report-img_src_x_onerror_alert_1-") and name.endswith(".pdf")


# --- similar confirmed cases ----------------------------------------------------------------------
SIMILAR_LABELS = ("MEL", "NV", "NV", "BKL", "MEL", "NV", "BCC", "NV")


def similar_answer(accepted: bool = True, thumbnails: bool = True) -> dict:
    """POST /v1/similar as the server sends it (k = 8, class-balanced vote)."""
    thumb = base64.b64encode(image_bytes(size=(32, 32), seed=7)).decode() if thumbnails else None
    votes = dict.fromkeys(CLASS_NAMES, 0.0) | {"MEL": 0.62, "NV": 0.18, "BKL": 0.12, "BCC": 0.08}
    neighbours = [
        {"image": f"ISIC_{i:07d}", "label": label, "distance": 0.05 + 0.01 * i, "thumbnail": thumb}
        for i, label in enumerate(SIMILAR_LABELS)
    ]
    return {
        "model_id": "default",
        "k": len(neighbours),
        "vote": "class-balanced",
        "neighbours": neighbours,
        "knn_probabilities": votes,
        "knn_top_class": "MEL",
        "gate": {"accepted": accepted, "reasons": []},
        "index_rows": 9000,
    }


def test_client_parses_similar_cases_and_the_missing_index() -> None:
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/similar"
        asked.append(dict(request.url.params))
        if request.url.params.get("model") == "bare":
            detail = "model 'bare' has no similar-cases index; build one: python jobs/x.py"
            return httpx.Response(404, json={"detail": detail})
        if request.url.params.get("model") == "odd":
            return httpx.Response(200, json={"neighbours": []})  # no model_id: not our server
        return httpx.Response(200, json=similar_answer())

    client = mock_client(handler)
    cases = client.similar("a.jpg", b"x", "default", k=8)
    assert asked[0] == {"k": "8", "model": "default"}
    assert cases.k == 8 and cases.knn_top_class == "MEL" and cases.accepted
    assert cases.neighbours[0] == SimilarCase(
        "ISIC_0000000", "MEL", 0.05, image_bytes(size=(32, 32), seed=7)
    )
    assert cases.knn_probabilities["MEL"] == 0.62 and set(cases.knn_probabilities) == set(
        CLASS_NAMES
    )
    assert cases.index_rows == 9000 and cases.vote == "class-balanced"
    with pytest.raises(ServeError, match=r"\(404\): .*build one: python jobs/") as info:
        client.similar("a.jpg", b"x", "bare")
    assert info.value.status == 404
    with pytest.raises(ServeUnavailable, match="without similar cases"):
        client.similar("a.jpg", b"x", "odd")


def test_state_asks_for_similar_cases_once_and_remembers_a_refusal(tmp_path) -> None:
    store = UploadStore(tmp_path)
    image = store.save("a.jpg", image_bytes(seed=3))
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.params.get("model"))
        if request.url.params.get("model") == "bare":
            return httpx.Response(404, json={"detail": "no similar-cases index; build one"})
        return httpx.Response(200, json=similar_answer())

    state, client = DashboardState(), mock_client(handler)
    first = state.similar_cases(client, store, image, "default")
    assert first is not None and state.similar_cases(client, store, image, "default") is first
    assert state.similar_cases(client, store, image, "bare") is None
    assert state.similar_cases(client, store, image, "bare") is None
    assert calls == ["default", "bare"]  # each asked once
    assert "build one" in state.similar_error(image.image_id, "bare")
    state.remove(store, image.image_id)
    assert not state.similar and state.similar_error(image.image_id, "bare") is None

    # no answer at all is not remembered: asked again on the next run
    down = ServeClient("http://127.0.0.1:9", connect_timeout_s=1)
    again = store.save("b.jpg", image_bytes(seed=4))
    with pytest.raises(ServeUnavailable):
        state.similar_cases(down, store, again, "default")
    assert state.similar_error(again.image_id, "default") is None


def test_similar_cases_views() -> None:
    cases = SimilarCases.from_json(similar_answer())
    result = Classification.from_json(trusted_answer())
    strip = similar_cases_html(cases, case_thumbnails(cases.neighbours))
    assert strip.count("<figure") == 8 and 'data-k="8"' in strip
    assert strip.count("data:image/jpeg;base64,") == 8 and "data-similar-caveat" not in strip
    assert 'data-label="MEL" data-image="ISIC_0000000" data-distance="0.0500"' in strip
    assert "distance 0.050" in strip and "Melanoma" in strip and "dn-case-malignant" in strip
    assert knn_vote_text(cases, result) == (
        "Vote of the 8 nearest confirmed cases (class-balanced): Melanoma (MEL) 62.0%; "
        "the model: Melanoma (MEL) 86.0%"
    )
    rows = probability_rows(result, cases)
    assert rows[0]["Class"] == "MEL" and rows[0][VOTE_COLUMN] == 0.62
    assert sum(row[VOTE_COLUMN] for row in rows) == pytest.approx(1.0)
    assert VOTE_COLUMN not in probability_rows(result)[0]

    # a refused upload: said above the cases; ids from the server are escaped
    refused = SimilarCases.from_json(similar_answer(accepted=False, thumbnails=False))
    odd = SimilarCase('<img src=x onerror="alert(1)">', "NV", 0.5)
    refused = SimilarCases(**{**refused.__dict__, "neighbours": (odd,)})
    strip = similar_cases_html(refused, [None])
    assert "data-similar-caveat" in strip and "mean little" in strip
    assert "no picture" in strip and "<img src=x" not in strip


def test_case_pictures_come_from_the_data_folder_without_thumbnails(tmp_path) -> None:
    (tmp_path / "ISIC_0000001.jpg").write_bytes(image_bytes(size=(120, 90), seed=1))
    (tmp_path / "ISIC_0000002.png").write_bytes(image_bytes("PNG", size=(50, 70), seed=2))
    (tmp_path / "ISIC_0000003.jpg").write_bytes(b"not a picture")
    ids = ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003", "ISIC_0000404", "../ISIC_0000001"]
    cases = [SimilarCase(i, "NV", 0.1) for i in ids]
    own = SimilarCase("ISIC_0000001", "NV", 0.1, thumbnail=b"JPEG bytes of the index")
    pictures = case_thumbnails([*cases, own], images_dir=tmp_path)
    assert [Image.open(io.BytesIO(p)).size for p in pictures[:2]] == [(96, 96), (96, 96)]
    assert pictures[2:5] == [None, None, None]  # unreadable, absent, not a plain file name
    assert pictures[5] == b"JPEG bytes of the index"  # the index's own thumbnail first
    assert folder_thumbnail(tmp_path, ".hidden") is None


def test_case_report_shows_the_similar_cases() -> None:
    report = CaseReport(
        image_name="a.jpg",
        image=image_bytes(size=(120, 90)),
        image_mime="image/jpeg",
        result=Classification.from_json(trusted_answer()),
        similar=SimilarCases.from_json(similar_answer()),
    )
    page = render_html(report)
    assert "<h2>Similar confirmed cases</h2>" in page and page.count('<figure class="dn-case') == 8
    assert "<th>k-NN vote (k=8)</th>" in page and "62.00%" in page
    assert "Vote of the 8 nearest confirmed cases" in page
    text = pdf_text(render_pdf(report))
    assert "Similar confirmed cases" in text and "k-NN vote (k=8)" in text
    assert "62.00%" in text and "d = 0.050" in text and "d = 0.120" in text
    assert "Vote of the 8 nearest confirmed cases (class-balanced): Melanoma" in text


# --- the PDF as drawn: rectangle fills under the table's text -----------------------------------
WHITE = (1.0, 1.0, 1.0)
RED_ZONE = (0xD6 / 255, 0x3A / 255, 0x3A / 255)  # the risk track's red zone
TOKEN = re.compile(rb"\((?:\\.|[^\\)])*\)|[-+]?(?:\d+\.?\d*|\.\d+)|[A-Za-z'\"*]+|\S")


@dataclass(frozen=True)
class Drawn:
    """What one PDF page paints, in order: filled rectangles and text runs (page points)."""

    fills: list[tuple[int, tuple[float, ...], tuple[float, float, float, float]]]
    texts: list[tuple[int, str, float, float]]  # (order, text, x, y) at the baseline start

    def background(self, text: str) -> list[tuple[float, ...]]:
        """The colour under each run of `text`: the last rectangle filled at its start before
        it was drawn (the painter's model), white where none was."""
        colours = []
        for order, what, x, y in self.texts:
            if what != text:
                continue
            under = [
                colour
                for at, colour, (left, bottom, right, top) in self.fills
                if at < order and left <= x + 1 <= right and bottom <= y + 2 <= top
            ]
            colours.append(under[-1] if under else WHITE)
        return colours


def page_streams(pdf: bytes) -> list[bytes]:
    """The deflated streams that draw text: the pages' content (images are left out)."""
    return [s for s in pdf_streams(pdf, deflated_only=True) if b"BT " in s and b" Tj" in s]


def pdf_drawing(pdf: bytes) -> Drawn:
    """Interpret the first page's content stream: enough of PDF's graphics operators (q/Q,
    g/rg, re with f/B/b, BT/Td/Tj) to know which fill colour lies under each text."""
    page = page_streams(pdf)[0]
    fills, texts, operands, stack = [], [], [], []
    colour, rects, position = (0.0, 0.0, 0.0), [], (0.0, 0.0)
    for order, token in enumerate(TOKEN.findall(page)):
        word = token.decode("latin-1")
        if re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)", word):
            operands.append(float(word))
            continue
        if word.startswith("("):
            operands.append(word[1:-1].replace("\\(", "(").replace("\\)", ")"))
            continue
        if word == "q":
            stack.append(colour)
        elif word == "Q":
            colour = stack.pop()
        elif word == "g":
            colour = (operands[-1],) * 3
        elif word == "rg":
            colour = tuple(operands[-3:])
        elif word == "re":
            x, y, w, h = operands[-4:]
            rects.append((min(x, x + w), min(y, y + h), max(x, x + w), max(y, y + h)))
        elif word in ("f", "F", "f*", "B", "B*", "b", "b*"):
            fills.extend((order, colour, rect) for rect in rects)
            rects = []
        elif word in ("S", "s", "n"):
            rects = []
        elif word == "Td":
            position = (operands[-2], operands[-1])
        elif word == "Tj":
            texts.append((order, operands[-1], *position))
        operands = [] if word.isalpha() or word in ("f*", "B*", "b*") else operands
    return Drawn(fills, texts)


@pytest.mark.parametrize("with_cases", [False, True])
def test_pdf_probability_table_is_not_painted_in_the_bar_colour(with_cases: bool) -> None:
    """The PDF once drew every cell of "Probabilities of all classes" in a bar's colour:
    fpdf2's table takes the fill colour in force as its cells' background, and the bar drawn
    above left it set. The table's body must lie on white, its heading on light grey."""
    report = CaseReport(
        image_name="a.jpg",
        image=image_bytes(size=(120, 90)),
        image_mime="image/jpeg",
        result=Classification.from_json(answer()),  # risk 1.35: the marker in the red zone
        risk_policy=POLICY,
        similar=SimilarCases.from_json(similar_answer()) if with_cases else None,
    )
    drawn = pdf_drawing(render_pdf(report))
    red = [f for f in drawn.fills if np.allclose(f[1], RED_ZONE, atol=2e-3)]
    assert red, "the risk track is no longer drawn: this test would check nothing"
    cells = ["Melanoma", "Actinic keratosis", "86.00%", "2.00%", "yes"]
    cells += ["62.00%", "18.00%"] if with_cases else []
    for text in cells:
        backgrounds = drawn.background(text)
        assert backgrounds, f"{text!r} is not drawn in the PDF"
        for colour in backgrounds:
            assert not np.allclose(colour, RED_ZONE, atol=0.02), f"{text!r} on red"
            assert np.allclose(colour, WHITE), f"{text!r} lies on {colour}, not white"
    (heading,) = drawn.background("Probability")
    assert np.allclose(heading, (243 / 255, 244 / 255, 246 / 255), atol=2e-3)


# --- accounts and cases: the client's requests and the records it parses ------------------------
def case_answer(risk: float | None = 0.42, light: str = "yellow") -> dict:
    """A stored classify answer as the server keeps it: the model version inside, no
    `model_id` (the answer schema that names the model as {"id", "sha256", "created"})."""
    body = answer(light) | {"risk": risk, "traffic_light": light}
    del body["model_id"]
    return body | {"model": {"id": "default", "sha256": "3f2a9c1b0d4e5f60", "created": "x"}}


def case_body() -> dict:
    image = {
        "sha256": "ab" * 32,
        "uploaded_at": "2026-03-04T10:00:00Z",
        "uploaded_by": "alice",
        "filename": "visit.jpg",
    }
    model = {"id": "default", "sha256": "3f2a9c1b0d4e5f60", "created": "2026-01-01T00:00:00"}
    refused = refused_answer() | {"model": model}
    green = case_answer(0.1, "green")
    return {
        "case_id": "c1",
        "patient": "P-0012",
        "lesion": "L1",
        "site": "left forearm",
        "created_at": "2026-01-01T09:00:00+00:00",
        "created_by": "alice",
        "image_count": 3,
        "last_taken_at": "2026-06-01",
        "latest_risk": 0.7,
        "latest_traffic_light": "red",
        "diagnosis": "MEL",
        "images": [
            image | {"image_id": "i1", "taken_at": "2026-01-02", "answer": green},
            image | {"image_id": "i2", "taken_at": "2026-03-04T10:00:00", "answer": refused},
            image | {"image_id": "i3", "taken_at": "2026-06-01", "answer": case_answer(0.7, "red")},
        ],
        "diagnoses": [
            {"diagnosis_id": "d1", "label": "MEL", "method": "histopathology", "note": "'; --",
             "by": "bob", "at": "2026-06-10T08:30:00Z"}
        ],
    }  # fmt: skip


def test_client_sends_the_key_and_speaks_the_cases_api() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.headers.get("authorization") != "Bearer s3cret":
            return httpx.Response(401, json={"detail": "unknown or revoked key"})
        if request.url.path == "/v1/me":
            return httpx.Response(200, json={"name": "alice", "role": "clinician"})
        if request.method == "POST" and request.url.path.endswith("/images"):
            return httpx.Response(201, json=case_answer() | {"image_id": "i9", "case_id": "c 1"})
        return httpx.Response(200, json={"cases": [], "total": 0, "events": []})

    client = ServeClient("127.0.0.1:9", transport=httpx.MockTransport(handler), api_key="s3cret")
    assert client.me() == {"name": "alice", "role": "clinician"}
    client.cases("  p-00 ")
    assert seen[-1].url.params["patient"] == "p-00" and seen[-1].url.params["limit"] == "50"
    client.cases("")
    assert "patient" not in seen[-1].url.params
    client.create_case("P-1", "L1", "")
    assert json.loads(seen[-1].content) == {"patient": "P-1", "lesion": "L1", "site": None}
    added = client.add_image("c 1/..", "v.jpg", b"jpeg bytes", "2026-06-01")
    assert added["image_id"] == "i9"
    upload = seen[-1]
    assert upload.url.raw_path == b"/v1/cases/c%201%2F../images"  # an id is one path segment
    assert b'name="taken_at"' in upload.content and b"2026-06-01" in upload.content
    assert b'filename="v.jpg"' in upload.content and b"jpeg bytes" in upload.content
    client.add_diagnosis("c1", "MEL", "histopathology", "note")
    assert json.loads(seen[-1].content)["method"] == "histopathology"
    client.audit("7d")
    assert seen[-1].url.path == "/v1/audit" and seen[-1].url.params["since"] == "7d"
    client.delete_image("c1", "i1")
    assert seen[-1].method == "DELETE" and seen[-1].url.path == "/v1/cases/c1/images/i1"
    assert all(r.headers["authorization"] == "Bearer s3cret" for r in seen)

    stranger = ServeClient("127.0.0.1:9", transport=httpx.MockTransport(handler), api_key="x")
    with pytest.raises(NotSignedIn, match="revoked") as refused:
        stranger.cases()
    assert refused.value.status == 401


def test_case_records_keep_the_stored_answers() -> None:
    case = CaseDetail.from_json(case_body())
    assert case.summary.title == "Patient P-0012 · lesion L1 (left forearm)"
    assert [i.image_id for i in case.images] == ["i1", "i2", "i3"]
    first = case.images[0]
    assert first.answer.risk == 0.1 and first.answer.traffic_light == "green"
    assert first.answer.model_id == "default" and first.answer.model.sha256.startswith("3f2a9c")
    assert first.model_text == "Model `default` · sha256 3f2a9c1b0d4e"
    assert case.images[1].answer.refused and case.images[1].taken_at.tzinfo is not None
    rows = case.risk_rows()  # the refused visit has no score: not on the chart
    assert [(r["Risk score"], r["Light"]) for r in rows] == [(0.1, "green"), (0.7, "red")]
    (diagnosis,) = case.diagnoses
    assert diagnosis.text() == "MEL (Melanoma), histopathology, by bob on 2026-06-10 08:30"
    assert diagnosis.note == "'; --"
    listed = CaseList.from_json({"cases": [case_body()], "total": 7})
    assert listed.total == 7 and listed.cases[0].latest_risk == 0.7
    assert listed.cases[0].diagnosis == "MEL" and when(None) == "–"
    (row,) = audit_rows(
        {"events": [{"at": "2026-06-01T12:00:00Z", "account": "root", "action": "classify",
                     "case_id": "c1", "image_id": "i1", "image_sha256": "ab" * 32,
                     "model": {"id": "default", "sha256": "3f2a9c1b0d4e5f60"}, "detail": None}]}
    )  # fmt: skip
    assert row["Model"] == "default (3f2a9c1b0d4e)" and row["Image sha256"] == "ab" * 6
    assert row["At (UTC)"] == "2026-06-01 12:00" and row["Detail"] == ""
    (row,) = audit_rows({"events": [{"action": "image.upload", "detail": {
        "traffic_light": "red", "gate_accepted": True, "reason": None}}]})  # fmt: skip
    assert row["Detail"] == "traffic_light: red · gate_accepted: True" and row["Model"] == ""


def test_sign_in_checks_the_name_against_the_keys_account() -> None:
    account = check_account(" alice ", {"name": "alice", "role": "clinician"})
    assert account == Account("alice", "clinician") and not account.is_admin
    assert account.may_delete("alice") and not account.may_delete("bob")
    assert Account("root", "admin").may_delete("bob")
    with pytest.raises(SignInFailed, match="do not match"):  # someone else's key
        check_account("alice", {"name": "bob", "role": "admin"})
    assert "revoked" in sign_in_problem(NotSignedIn("x", status=401))


def test_uploads_are_kept_per_account(tmp_path) -> None:
    store = UploadStore(tmp_path / "up")
    alice, bob = store.for_account("alice"), store.for_account("../bob")
    kept = alice.save("a.jpg", image_bytes())
    assert [i.image_id for i in alice.list()] == [kept.image_id] and bob.list() == []
    assert bob.root.parent == store.root and bob.root.name.startswith("bob-")
    assert store.for_account("alice").root == alice.root != store.for_account("Alice").root


def test_a_refused_key_is_not_remembered_as_an_images_error(tmp_path) -> None:
    """A 401 while classifying signs the page out; it is no verdict on the image."""
    store = UploadStore(tmp_path / "up")
    state = DashboardState()
    outcome = state.add_uploads(store, [("f1", "a.jpg", image_bytes())])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": "unknown or revoked key"})

    with pytest.raises(NotSignedIn):
        state.classify_missing(mock_client(handler), store, store.list(), "default")
    assert state.error(outcome.stored[0].image_id, "default") is None
