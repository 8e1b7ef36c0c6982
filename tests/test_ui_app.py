"""ui/app.py in Streamlit's AppTest, against the session's real Ray Serve (SYNTHETIC images):
sign-in with the server's accounts, the cases pages, the single-image page and About."""

from __future__ import annotations

import datetime as dt
import io
import socket
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from dermanet.classes import CLASS_NAMES
from dermanet.paths import PROJECT_ROOT

pytest_plugins = ["conftest_serve", "conftest_ui"]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]

APP = str(PROJECT_ROOT / "ui" / "app.py")


def run(target) -> AppTest:
    """Run the app (an AppTest, or a widget after an interaction) and fail on any exception."""
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def markdown(at: AppTest, needle: str) -> list[str]:
    return [m.value for m in at.markdown if needle in m.value and "<style>" not in m.value]


def captions(at: AppTest) -> list[str]:
    return [c for image in at.get("image") for c in image.captions if c]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def server_answer(serve_url: str, data: bytes, key: str, model: str = "default") -> dict:
    files = {"file": ("x.jpg", data)}
    params = {"model": model}
    return httpx.post(
        f"{serve_url}/v1/classify", files=files, params=params, headers=bearer(key), timeout=120
    ).json()


def signed_in(keys: dict[str, str], name: str, page: str = "Cases") -> AppTest:
    """The app after `name` signed in with their key, on `page`."""
    at = run(AppTest.from_file(APP, default_timeout=180))
    at.text_input(key="signin_name").input(name)
    at.text_input(key="signin_key").input(keys[name])
    run(at.button[0].click())
    assert at.radio(key="page").value == "Cases", [e.value for e in at.error]
    return run(at.radio(key="page").set_value(page)) if page != "Cases" else at


def test_dashboard_workflow(
    ui_env: Path, ui_images: list[Path], serve_url: str, dashboard_keys: dict[str, str]
) -> None:
    key = dashboard_keys["ui-alice"]
    at = signed_in(dashboard_keys, "ui-alice", "Single image")
    ui_env = _account_folder(ui_env, "ui-alice")
    assert markdown(at, "Research software, not a medical device")
    assert "Upload one or more" in at.info[0].value
    assert at.selectbox(key="model").value == "default"  # the server's default at start
    assert at.selectbox(key="model").options == ["default (default)", "tiny-random", "trusted"]

    # upload several at once: kept under generated names, gallery filled, newest selected
    png = io.BytesIO()
    Image.open(ui_images[2]).save(png, format="PNG")
    files = [
        (ui_images[0].name, ui_images[0].read_bytes(), "image/jpeg"),
        (ui_images[1].name, ui_images[1].read_bytes(), "image/jpeg"),
        ("lesion three.png", png.getvalue(), "image/png"),
        ("broken.png", b"not an image at all", "image/png"),
    ]
    run(at.file_uploader[0].set_value(files))
    stored = sorted(p.name for p in ui_env.glob("*") if not p.name.endswith((".json", "thumb.jpg")))
    assert len(stored) == 3 and all(len(Path(n).stem) == 32 for n in stored)
    assert any("broken.png: not a readable" in w.value for w in at.warning)
    views = [b for b in at.button if b.key.startswith("view-")]
    assert len(views) == 3 and len(markdown(at, 'class="dn-card-name"')) == 3
    for card in markdown(at, 'class="dn-card-name"'):
        assert any(f"dn-light-{light}" in card for light in ("green", "yellow", "red"))
    assert at.subheader[0].value == "lesion three.png"  # the last upload is selected

    # selection by clicking a card, then the risk score and the expander carry the server's numbers
    state = at.session_state["dn"]
    target = next(i for i in state.predictions if i[0] != state.selected)[0]
    run(at.button(key=f"view-{target}").click())
    assert at.session_state["dn"].selected == target
    name = next(i.original_name for i in _store(ui_env) if i.image_id == target)
    assert at.subheader[0].value == name
    expected = server_answer(serve_url, (ui_env / _stored_name(ui_env, target)).read_bytes(), key)
    score = markdown(at, 'class="dn-risk"')[0]  # a score on the policy's scale, no percentage
    assert f'data-risk="{expected["risk"]:.4f}"' in score
    assert f"Risk score <b>{expected['risk']:.2f}</b>" in score
    assert "on 0–1.5; green &lt; 0.15, red ≥ 0.6" in score and "%;" in score
    big = markdown(at, "dn-light-big")[0]
    assert f"dn-light-{expected['traffic_light']}" in big and f"score {expected['risk']:.2f}" in big
    assert at.expander[0].label == "Probabilities of all classes"
    table = at.dataframe[0].value
    assert sorted(table["Class"]) == sorted(CLASS_NAMES)
    for row in table.itertuples():
        assert row.Probability == pytest.approx(expected["probabilities"][row.Class], abs=1e-6)
    assert [b.label for b in at.get("download_button")] == ["HTML", "PDF"]

    # Grad-CAM: toggle, display mode above the image, opacity, class (predicted by default)
    run(at.toggle(key="gradcam").set_value(True))
    top = expected["top_class"]
    assert at.segmented_control(key="cam_mode").value == "overlay"
    assert at.selectbox(key="cam_class").value is None
    assert at.selectbox(key="cam_class").options[0] == f"Predicted class ({top})"
    assert any(c.startswith(f"Grad-CAM · {top} (") and c.endswith("Overlay") for c in captions(at))
    cams = at.session_state["dn"].gradcams
    overlay = cams[(target, "default", "", "overlay", 0.5)].png
    run(at.slider(key="cam_opacity").set_value(0.9))
    stronger = at.session_state["dn"].gradcams[(target, "default", "", "overlay", 0.9)].png
    assert stronger != overlay
    run(at.segmented_control(key="cam_mode").set_value("heatmap"))
    assert any(c.endswith("Heatmap") for c in captions(at))
    assert at.slider(key="cam_opacity").disabled
    run(at.segmented_control(key="cam_mode").set_value("side_by_side"))
    side = at.session_state["dn"].gradcams[(target, "default", "", "side_by_side", 0.9)].png
    width = Image.open(io.BytesIO(side)).size[0]
    assert width == 2 * Image.open(io.BytesIO(overlay)).size[0]
    run(at.selectbox(key="cam_class").set_value("MEL"))
    assert any(c.startswith("Grad-CAM · MEL (") for c in captions(at))

    # checkpoint switch: every image is re-classified by the chosen model
    run(at.selectbox(key="model").set_value("tiny-random"))
    state = at.session_state["dn"]
    assert {key for key in state.predictions if key[1] == "tiny-random"} == {
        (i.image_id, "tiny-random") for i in _store(ui_env)
    }
    other = server_answer(
        serve_url, (ui_env / _stored_name(ui_env, target)).read_bytes(), key, "tiny-random"
    )
    assert f'data-risk="{other["risk"]:.4f}"' in markdown(at, 'class="dn-risk"')[0]
    assert any(c.startswith("Grad-CAM · MEL (") for c in captions(at))
    assert "tiny-random" in next(c.value for c in at.caption if c.value.startswith("Model"))

    # remove the selected image: files gone, another image selected
    run(at.button(key=f"remove-{target}").click())
    assert target not in {i.image_id for i in _store(ui_env)}
    assert not list(ui_env.glob(f"{target}*"))
    assert len([b for b in at.button if b.key.startswith("view-")]) == 2
    assert at.session_state["dn"].selected != target

    # About page, with the server's risk policy
    run(at.radio(key="page").set_value("About"))
    assert at.header[0].value == "About DermaNet"
    assert markdown(at, "1.5·P(MEL) + 1.3·P(BCC) + 1·P(SCC)")
    assert markdown(at, "Research software, not a medical device")
    assert not markdown(at, 'class="dn-card-name"')


def test_refused_upload_and_plausible_classes(
    ui_env: Path,
    ui_images: list[Path],
    not_dermoscopy: dict[str, bytes],
    serve_url: str,
    dashboard_keys: dict[str, str],
) -> None:
    """A screenshot uploaded by mistake: grey light and the reason instead of a risk level; a
    lesion the `trusted` model accepts: its plausible classes beside the top class."""
    key = dashboard_keys["ui-bob"]
    accepted = [
        server_answer(serve_url, p.read_bytes(), key, "trusted")["gate"]["accepted"]
        for p in ui_images
    ]
    lesion = ui_images[accepted.index(True)]  # a SYNTHETIC lesion the trusted model accepts
    at = signed_in(dashboard_keys, "ui-bob", "Single image")
    ui_env = _account_folder(ui_env, "ui-bob")
    files = [
        ("dashboard screenshot.png", not_dermoscopy["screenshot"], "image/png"),
        (lesion.name, lesion.read_bytes(), "image/jpeg"),
    ]
    run(at.file_uploader[0].set_value(files))
    ids = {i.original_name: i.image_id for i in _store(ui_env)}
    cards = {name: c for name in ids for c in markdown(at, 'class="dn-card-name"') if name in c}
    shot = cards["dashboard screenshot.png"]
    assert "dn-light-unknown" in shot and "Not assessed" in shot
    assert "This does not look like a dermoscopic image" in shot  # the reason, in the tooltip
    assert any(f"dn-light-{light}" in cards[lesion.name] for light in ("green", "yellow", "red"))
    assert any(c.value.startswith("Gate: quality checks only") for c in at.caption)

    run(at.button(key=f"view-{ids['dashboard screenshot.png']}").click())
    big = markdown(at, "dn-light-big")[0]
    assert "dn-light-unknown" in big and "Not assessed" in big and "risk score" not in big
    message = markdown(at, "dn-refusal")[0]
    assert "This does not look like a dermoscopic image" in message
    assert "looks like a screen, document or graphic" in message
    assert markdown(at, 'data-risk="not-assessed"') and not markdown(at, "dn-risk-marker")
    assert at.expander[0].label.endswith("(unreliable: the image was refused)")
    assert not markdown(at, "Plausible classes")

    run(at.selectbox(key="model").set_value("trusted"))  # a model with statistics
    assert any(c.value.startswith("Gate: quality checks + OOD score") for c in at.caption)
    assert any(c.value.startswith("Prediction sets: split conformal") for c in at.caption)
    assert "dn-light-unknown" in markdown(at, "dn-light-big")[0]  # still refused
    run(at.button(key=f"view-{ids[lesion.name]}").click())
    expected = server_answer(serve_url, lesion.read_bytes(), key, "trusted")
    plausible = f"Plausible classes (90 % set): {', '.join(expected['prediction_set'])}"
    assert markdown(at, plausible)
    assert f"dn-light-{expected['traffic_light']}" in markdown(at, "dn-light-big")[0]
    assert not markdown(at, "dn-refusal") and markdown(at, 'class="dn-risk-marker"')


def test_similar_confirmed_cases_under_the_prediction(
    similar_index,
    ui_env: Path,
    ui_images: list[Path],
    serve_url: str,
    dashboard_keys: dict[str, str],
) -> None:
    """`default` has an index (built from the SYNTHETIC training split): under the prediction,
    the server's 8 nearest cases (thumbnail, diagnosis, distance) and their vote as a column
    beside the probabilities; `tiny-random` has none: the server's 404 saying how to build one."""
    lesion = ui_images[1]
    expected = httpx.post(
        f"{serve_url}/v1/similar",
        files={"file": ("x.jpg", lesion.read_bytes())},
        headers=bearer(dashboard_keys["ui-alice"]),
        timeout=120,
    ).json()
    at = signed_in(dashboard_keys, "ui-alice", "Single image")
    run(at.file_uploader[0].set_value([(lesion.name, lesion.read_bytes(), "image/jpeg")]))
    assert "Similar confirmed cases" in [s.value for s in at.subheader]
    (strip,) = markdown(at, 'class="dn-cases"')
    assert strip.count('<figure class="dn-case') == 8 == len(expected["neighbours"])
    for case in expected["neighbours"]:
        assert f'data-label="{case["label"]}" data-image="{case["image"]}"' in strip
        assert f'data-distance="{case["distance"]:.4f}"' in strip
    assert strip.count("data:image/jpeg;base64,") == 8  # the index's thumbnails
    top = expected["knn_top_class"]
    vote = markdown(at, "Vote of the 8 nearest confirmed cases (class-balanced)")[0]
    assert f"({top}) {expected['knn_probabilities'][top]:.1%}" in vote
    table = at.dataframe[0].value
    assert list(table.columns)[-1] == "k-NN vote"
    for name, vote in zip(table["Class"], table["k-NN vote"], strict=True):
        assert vote == pytest.approx(expected["knn_probabilities"][name])

    run(at.selectbox(key="model").set_value("tiny-random"))  # a model without an index
    assert not markdown(at, 'class="dn-cases"')
    message = next(i.value for i in at.info if "similar-cases index" in i.value)
    assert "(404)" in message and "python jobs/build_index.py --model" in message


def test_sign_in_with_the_servers_accounts(ui_env: Path, dashboard_keys: dict[str, str]) -> None:
    """A wrong key or another account's key: a message and no pages; the right one: pages
    (Audit for admins only), the key nowhere but in the client; sign-out forgets it all."""
    at = run(AppTest.from_file(APP, default_timeout=120))
    assert [t.label for t in at.text_input] == ["Account name", "API key"]
    password = at.text_input(key="signin_key").proto
    assert password.type == password.PASSWORD  # typed unseen
    at.text_input(key="signin_name").input("ui-alice")
    at.text_input(key="signin_key").input("dn_0123456789abcdef_" + "x" * 43)
    run(at.button[0].click())
    assert "do not match, or the key was revoked" in at.error[0].value and not at.radio
    at.text_input(key="signin_key").input(dashboard_keys["ui-bob"])  # bob's key, alice's name
    run(at.button[0].click())
    assert "do not match" in at.error[0].value and "account" not in at.session_state

    at.text_input(key="signin_key").input(dashboard_keys["ui-alice"])
    run(at.button[0].click())
    assert at.radio(key="page").options == ["Cases", "Single image", "About"]
    assert at.markdown and markdown(at, "Signed in as **ui-alice** (clinician)")
    key = dashboard_keys["ui-alice"]
    assert not [k for k in at.session_state if at.session_state[k] == key]  # only the client
    run(at.button(key="sign_out").click())
    assert not at.radio and at.button[0].label == "Sign in" and "client" not in at.session_state

    admin = signed_in(dashboard_keys, "ui-root")
    assert admin.radio(key="page").options == ["Cases", "Single image", "Audit", "About"]


def _create_case(at: AppTest, patient: str, lesion: str, site: str = "") -> AppTest:
    for field, value in zip(at.text_input[:3], (patient, lesion, site), strict=True):
        field.input(value)
    return run(next(b for b in at.button if b.label == "Create case").click())


def _upload(at: AppTest, name: str, data: bytes, taken: str) -> AppTest:
    at.file_uploader(key="case_upload").set_value([(name, data, "image/jpeg")])
    at.date_input(key="case_taken").set_value(dt.date.fromisoformat(taken))
    return run(next(b for b in at.button if b.label == "Upload and classify").click())


def test_cases_two_users_and_the_audit(
    ui_env: Path, ui_images: list[Path], serve_url: str, dashboard_keys: dict[str, str]
) -> None:
    """alice creates a case and uploads two visits (out of order) and a diagnosis; bob sees
    her case at once but can delete neither her images nor her case; root (admin) deletes an
    image, reads the audit and deletes the case: alice's open page reads "no longer
    available"."""
    patient = f"P-{uuid.uuid4().hex[:6]}"
    key = dashboard_keys["ui-alice"]
    alice = signed_in(dashboard_keys, "ui-alice")
    _create_case(alice, patient, "L1", "left forearm")
    assert alice.title[0].value == f"Patient {patient} · lesion L1 (left forearm)"
    assert "Case created" in alice.success[0].value and "No images yet" in alice.info[0].value
    _upload(alice, "june.jpg", ui_images[0].read_bytes(), "2026-06-01")
    _upload(alice, "january.jpg", ui_images[1].read_bytes(), "2026-01-02")
    assert "january.jpg added" in alice.success[0].value
    case_id = alice.session_state["case_id"]
    stored = httpx.get(f"{serve_url}/v1/cases/{case_id}", headers=bearer(key), timeout=60).json()
    assert [i["filename"] for i in stored["images"]] == ["january.jpg", "june.jpg"]  # time order
    scores = markdown(alice, 'class="dn-risk"')
    for image, score in zip(stored["images"], scores, strict=True):  # the STORED answers
        assert f'data-risk="{image["answer"]["risk"]:.4f}"' in score
        assert "on 0–1.5; green &lt; 0.15, red ≥ 0.6" in score
    model = stored["images"][0]["answer"]["model"]
    visit_captions = [c.value for c in alice.caption if c.value.startswith("Model `")]
    assert visit_captions[0].startswith(f"Model `{model['id']}` · sha256 {model['sha256'][:12]}")
    assert "uploaded by ui-alice" in visit_captions[0]
    assert alice.get("vega_lite_chart") and "Risk score per visit" in [
        s.value for s in alice.subheader
    ]
    deletes = sorted(b.key for b in alice.button if b.key and b.key.startswith("delete-"))
    assert deletes == sorted(f"delete-{i['image_id']}" for i in stored["images"])

    alice.selectbox(key="dx_label").set_value("MEL")
    alice.selectbox(key="dx_method").set_value("histopathology")
    alice.text_area(key="dx_note").input("Excised'; DROP TABLE cases; --")
    run(next(b for b in alice.button if b.label == "Record diagnosis").click())
    assert "Confirmed diagnosis: MEL (Melanoma), histopathology, by ui-alice" in " ".join(
        s.value for s in alice.success
    )
    assert markdown(alice, "Excised&#x27;; DROP TABLE cases; --")

    bob = signed_in(dashboard_keys, "ui-bob")  # another user: sees the new case at once
    bob.text_input(key="case_search").input(patient.lower())
    run(bob)
    (card,) = markdown(bob, f"Patient {patient}")
    assert "2 images" in card and "diagnosis **MEL**" in card
    run(bob.button(key=f"open-{case_id}").click())
    assert bob.title[0].value.startswith(f"Patient {patient}")
    assert not [b for b in bob.button if b.key and b.key.startswith("delete")]  # not his
    assert alice.button(key="delete_case")  # hers

    root = signed_in(dashboard_keys, "ui-root")
    root.text_input(key="case_search").input(patient)
    run(root)
    run(root.button(key=f"open-{case_id}").click())
    june = next(i["image_id"] for i in stored["images"] if i["filename"] == "june.jpg")
    run(root.button(key=f"delete-{june}").click())
    assert "june.jpg deleted" in root.success[0].value
    run(alice)  # alice's page no longer shows it
    assert [b.key for b in alice.button if b.key and b.key.startswith("delete-")] == [
        f"delete-{stored['images'][0]['image_id']}"
    ]
    run(root.radio(key="page").set_value("Audit"))
    events = root.dataframe[0].value
    assert {"Account", "Action", "Image sha256", "Model"} <= set(events.columns)
    assert {"ui-alice", "ui-root"} <= set(events["Account"])
    mine = events[events["Case"] == case_id]
    assert {"case.create", "image.upload", "diagnosis.add", "image.delete"} <= set(mine["Action"])

    run(root.radio(key="page").set_value("Cases"))  # back on the case: the admin deletes it
    run(root.button(key="delete_case").click())
    assert root.title[0].value == "Cases" and "Case deleted" in root.success[0].value
    gone = httpx.get(f"{serve_url}/v1/cases/{case_id}", headers=bearer(key), timeout=60)
    assert gone.status_code == 404
    run(alice)
    assert "no longer available" in alice.info[0].value
    run(alice.button(key="back").click())
    assert alice.title[0].value == "Cases"


def test_unreachable_server_shows_a_message(ui_env: Path, monkeypatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("DERMANET_SERVE_URL", dead)
    at = run(AppTest.from_file(APP, default_timeout=60))
    assert not [t for t in at.text_input if "URL" in t.label]  # configuration, not a field
    at.text_input(key="signin_name").input("ui-alice")
    at.text_input(key="signin_key").input("dn_whatever")
    run(at.button[0].click())
    message = at.error[0].value
    assert "not reachable" in message and dead in message and "make demo" in message
    assert "page" not in at.session_state and markdown(at, "Research software")


def _account_folder(uploads: Path, name: str) -> Path:
    from dermanet.ui.storage import UploadStore

    return UploadStore(uploads).for_account(name).root


def _store(folder: Path):
    from dermanet.ui.storage import UploadStore

    return UploadStore(folder).list()


def _stored_name(folder: Path, image_id: str) -> str:
    return next(i.stored_name for i in _store(folder) if i.image_id == image_id)
