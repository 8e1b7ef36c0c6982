"""The cases API over real HTTP on the session's Serve and SQLite database: keys and roles,
cases, uploads stored with the answer they got, diagnoses, soft deletes, the audit, and bad
input that changes nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from dermanet.data.synthetic import draw_lesion

pytest_plugins = ["conftest_serve"]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
SQL_LIKE = 'Robert\'); DROP TABLE lesions; -- % _ \\ "x"'


@pytest.fixture(scope="module")
def keys(serve_account: SimpleNamespace) -> dict[str, str]:
    """Keys of two clinicians and a clinician revoked at once (the admin is serve_account's)."""
    from dermanet.accounts import add_account, revoke_account
    from dermanet.db import session_factory

    with session_factory(serve_account.database_url).begin() as session:
        made = {name: add_account(session, name, "clinician")[1] for name in ("cl-a", "cl-b")}
        made["gone"] = add_account(session, "cl-gone", "clinician")[1]
        revoke_account(session, "cl-gone")
    return made | {"admin": serve_account.key}


@pytest.fixture(scope="module")
def api(serve_url: str, keys: dict[str, str]):
    clients = {
        name: httpx.Client(
            base_url=serve_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        )
        for name, key in keys.items()
    }
    clients["anonymous"] = httpx.Client(base_url=serve_url, timeout=120)
    yield SimpleNamespace(**clients)
    for client in clients.values():
        client.close()


def lesion_jpeg(seed: int, planting) -> bytes:
    pixels, _ = draw_lesion("NV", 128, np.random.default_rng(seed))
    return planting.encode(pixels, "JPEG", quality=92)


def test_keys_and_roles(api, keys, serve_url: str) -> None:
    for path in ("/v1/models", "/v1/me", "/v1/cases", "/v1/audit"):
        response = api.anonymous.get(path)
        assert response.status_code == 401, path
        assert (
            response.headers["www-authenticate"] == "Bearer"
            and "Bearer" in response.json()["detail"]
        )
    assert api.anonymous.post("/v1/classify", files={"file": ("a.jpg", b"x")}).status_code == 401
    assert api.gone.get("/v1/me").status_code == 401  # revoked
    wrong = keys["cl-a"][:-4] + "AAAA"
    assert (
        httpx.get(f"{serve_url}/v1/me", headers={"Authorization": f"Bearer {wrong}"}).status_code
        == 401
    )
    assert api.anonymous.get("/healthz/live").status_code == 200  # health checks stay open
    assert api.admin.get("/v1/me").json() == {"name": "test-admin", "role": "admin"}
    assert api.__dict__["cl-a"].get("/v1/me").json() == {"name": "cl-a", "role": "clinician"}
    denied = api.__dict__["cl-a"].get("/v1/audit")
    assert denied.status_code == 403 and "admins only" in denied.json()["detail"]


def test_a_case_from_first_visit_to_diagnosis(api, planting, not_dermoscopy) -> None:
    alice, bob, admin = api.__dict__["cl-a"], api.__dict__["cl-b"], api.admin
    created = alice.post(
        "/v1/cases", json={"patient": " PX-77 ", "lesion": "L-back-1", "site": "back"}
    )
    assert created.status_code == 201, created.text
    case = created.json()
    assert (case["patient"], case["lesion"], case["created_by"], case["image_count"]) == (
        "PX-77",
        "L-back-1",
        "cl-a",
        0,
    )
    again = bob.post("/v1/cases", json={"patient": "PX-77", "lesion": "L-back-1"})
    assert again.status_code == 409 and f"case_id {case['case_id']}" in again.json()["detail"]
    url = f"/v1/cases/{case['case_id']}"

    later, earlier = lesion_jpeg(1, planting), lesion_jpeg(2, planting)
    first = alice.post(
        f"{url}/images", files={"file": ("later.jpg", later)}, data={"taken_at": "2026-05-02"}
    )
    assert first.status_code == 201, first.text
    second = bob.post(
        f"{url}/images",
        files={"file": ("earlier.jpg", earlier)},
        data={"taken_at": "2026-01-15T10:00:00Z", "model": "trusted"},
    )
    assert second.status_code == 201, second.text
    refused = alice.post(f"{url}/images", files={"file": ("blank.png", not_dermoscopy["blank"])})
    assert refused.status_code == 201 and refused.json()["gate"]["accepted"] is False

    # the stored answer is the one the uploader got, and the one /v1/classify gives
    direct = alice.post("/v1/classify", files={"file": ("x.jpg", later)}).json()
    assert first.json()["probabilities"] == direct["probabilities"]
    full = alice.get(url).json()
    assert [image["filename"] for image in full["images"]] == [
        "earlier.jpg",
        "later.jpg",
        "blank.png",
    ]
    for image, sent in zip(full["images"], (second, first, refused), strict=True):
        body = sent.json()
        assert image["answer"] == {
            k: v for k, v in body.items() if k not in ("image_id", "case_id")
        }
        assert image["image_id"] == body["image_id"] and body["case_id"] == case["case_id"]
    assert full["images"][0]["uploaded_by"] == "cl-b"
    assert full["images"][1]["sha256"] == hashlib.sha256(later).hexdigest()
    stored = alice.get(f"{url}/images/{first.json()['image_id']}/file")
    assert stored.content == later and stored.headers["content-type"] == "image/jpeg"

    diagnosis = bob.post(
        f"{url}/diagnosis", json={"label": "MEL", "method": "histopathology", "note": SQL_LIKE}
    )
    assert diagnosis.status_code == 201, diagnosis.text
    assert diagnosis.json()["note"] == SQL_LIKE and diagnosis.json()["by"] == "cl-b"
    listed = alice.get("/v1/cases", params={"patient": "px-7"}).json()
    summary = next(c for c in listed["cases"] if c["case_id"] == case["case_id"])
    assert summary["image_count"] == 3 and summary["diagnosis"]["label"] == "MEL"
    assert summary["last_taken_at"] is not None and listed["total"] >= 1

    # deleting: only the uploader or an admin; the creator or an admin for a case
    image_url = f"{url}/images/{second.json()['image_id']}"
    assert alice.delete(image_url).status_code == 403
    assert bob.delete(image_url).json() == {"deleted": True}
    assert alice.get(f"{image_url}/file").status_code == 404
    assert alice.get(url).json()["image_count"] == 2
    assert bob.delete(url).status_code == 403
    assert admin.delete(url).json() == {"deleted": True}
    assert alice.get(url).status_code == 404

    events = admin.get("/v1/audit", params={"since": "1h", "limit": 500}).json()["events"]
    mine = [e for e in events if e["case_id"] == case["case_id"]]
    assert {e["action"] for e in mine} >= {
        "case.create",
        "image.upload",
        "diagnosis.add",
        "image.delete",
        "case.delete",
    }
    upload = next(e for e in mine if e["image_id"] == first.json()["image_id"])
    assert (
        upload["account"] == "cl-a" and upload["image_sha256"] == hashlib.sha256(later).hexdigest()
    )
    assert upload["model"]["id"] == first.json()["model_id"]
    classified = next(e for e in events if e["action"] == "classify" and e["account"] == "cl-a")
    assert classified["image_sha256"] == hashlib.sha256(later).hexdigest()
    assert events == sorted(events, key=lambda e: e["at"], reverse=True)


def test_bad_input_changes_nothing(api, planting, serve_account) -> None:
    alice = api.__dict__["cl-a"]
    case = alice.post("/v1/cases", json={"patient": SQL_LIKE[:60], "lesion": "L1"}).json()
    assert case["patient"] == SQL_LIKE[:60].strip()  # stored verbatim
    url = f"/v1/cases/{case['case_id']}"
    jpeg = lesion_jpeg(3, planting)
    assert alice.post("/v1/cases/999999/images", files={"file": ("a.jpg", jpeg)}).status_code == 404
    assert alice.get("/v1/cases/999999").status_code == 404
    no_file = alice.post(f"{url}/images", files={"picture": ("a.jpg", jpeg)})
    assert no_file.status_code == 400 and "'file'" in no_file.json()["detail"]
    assert (
        alice.post(f"{url}/images", files={"file": ("a.jpg", b"not an image")}).status_code == 422
    )
    assert (
        alice.post(
            f"{url}/images", files={"file": ("a.jpg", jpeg)}, data={"taken_at": "yesterday"}
        ).status_code
        == 422
    )
    too_big = b"\xff\xd8\xff" + b"0" * (3 * 1024 * 1024)
    assert alice.post(f"{url}/images", files={"file": ("a.jpg", too_big)}).status_code == 413
    for body in (
        {"patient": "x" * 65, "lesion": "L2"},
        {"patient": "   ", "lesion": "L2"},
        {"patient": "P", "lesion": "L2", "site": "s" * 65},
        {"patient": "P"},
    ):
        assert alice.post("/v1/cases", json=body).status_code == 422, body
    for body in (
        {"label": "CANCER", "method": "clinical"},
        {"label": "MEL", "method": "guess"},
        {"label": "MEL", "method": "clinical", "note": "n" * 2001},
    ):
        assert alice.post(f"{url}/diagnosis", json=body).status_code == 422, body
    assert alice.get("/v1/cases", params={"limit": 0}).status_code == 422
    assert alice.get("/v1/cases/abc").status_code == 422
    assert alice.delete(f"{url}/images/999999").status_code == 404
    found = alice.get("/v1/cases", params={"patient": "%", "limit": 1000}).json()["cases"]
    assert found and all("%" in c["patient"] for c in found)  # LIKE wildcards taken literally
    after = alice.get(url).json()
    assert after["image_count"] == 0 and after["diagnoses"] == []
    assert not list((serve_account.data_dir / "images").rglob("*.tmp"))


def test_keys_never_reach_a_log(api, keys) -> None:
    import ray

    from dermanet.accounts.keys import parse_key

    api.anonymous.get("/v1/me", headers={"Authorization": "Bearer dn_0000000000000000_" + "s" * 43})
    api.gone.get("/v1/cases")
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    secrets = [parse_key(key)[1] for key in keys.values()] + ["s" * 43]  # may hold "_"
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            assert not any(secret in text for secret in secrets), path
