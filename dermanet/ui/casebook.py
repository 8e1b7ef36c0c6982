"""The case pages' data: accounts, cases, their images with STORED answers, diagnoses, audit.

Parses the server's `/v1/me`, `/v1/cases*` and `/v1/audit` answers into small frozen records
the dashboard lays out. Nothing here asks the model: a case image shows the answer the server
stored when it was uploaded (model id and sha256 included), never a new one, so a case reads
the same tomorrow whatever checkpoint is the default then.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dermanet.classes import CLASS_DESCRIPTIONS
from dermanet.ui.client import Classification, ServeError

ROLES = ("clinician", "admin")
DIAGNOSIS_METHODS = {
    "histopathology": "Histopathology",
    "clinical": "Clinical",
    "follow_up": "Follow-up",
}
AUDIT_SPANS = {"24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days", "": "All"}
GONE = "This case is no longer available: it was deleted, perhaps by another user."
IMAGE_GONE = "This image is no longer available: it was deleted, perhaps by another user."


class SignInFailed(Exception):
    """The name and key do not sign in; `str()` says what to do."""


@dataclass(frozen=True)
class Account:
    """The signed-in account as the server knows it (`GET /v1/me`)."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_delete(self, owner: str) -> bool:
        """Whether to offer deleting an item `owner` made (the server decides anyway)."""
        return self.is_admin or owner == self.name

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Account:
        return cls(name=str(body["name"]), role=str(body.get("role") or "clinician"))


def check_account(name: str, me: Mapping[str, Any]) -> Account:
    """The account `/v1/me` named for the key, if it is the one the user typed.

    A key is tied to one account: a user who types their colleague's name with their own key
    is refused rather than silently signed in as someone else.
    """
    account = Account.from_json(me)
    if account.name != name.strip():
        raise SignInFailed("The account name and key do not match: check both and try again.")
    return account


def sign_in_problem(exc: ServeError) -> str:
    """The sign-in page's message for a refused check (401: wrong or revoked key)."""
    if exc.status == 401:
        return "The account name and key do not match, or the key was revoked: check both."
    return str(exc)


def _time(value: Any) -> dt.datetime | None:
    """An ISO 8601 date or datetime from the server (UTC when it has no zone), or None."""
    if not value:
        return None
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def when(value: dt.datetime | None, with_time: bool = True) -> str:
    """2026-12-07 06:34 (UTC) or 2026-12-07; "–" for no time."""
    if value is None:
        return "–"
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%d %H:%M") if with_time else value.strftime("%Y-%m-%d")


@dataclass(frozen=True)
class Diagnosis:
    """A confirmed diagnosis: class, how it was confirmed, by whom and when."""

    diagnosis_id: str
    label: str
    method: str
    note: str
    by: str
    at: dt.datetime | None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Diagnosis:
        return cls(
            diagnosis_id=str(body.get("diagnosis_id", "")),
            label=str(body["label"]),
            method=str(body.get("method", "")),
            note=str(body.get("note") or ""),
            by=str(body.get("by", "")),
            at=_time(body.get("at")),
        )

    def text(self) -> str:
        """MEL (Melanoma), histopathology, by alice on 2026-12-07 06:34"""
        name = CLASS_DESCRIPTIONS.get(self.label, self.label)
        method = DIAGNOSIS_METHODS.get(self.method, self.method).lower()
        return f"{self.label} ({name}), {method}, by {self.by} on {when(self.at)}"


@dataclass(frozen=True)
class CaseSummary:
    """One row of the case list (`GET /v1/cases`)."""

    case_id: str
    patient: str
    lesion: str
    site: str
    created_at: dt.datetime | None
    created_by: str
    image_count: int
    last_taken_at: dt.datetime | None
    latest_risk: float | None
    latest_traffic_light: str
    diagnosis: str | None

    @property
    def title(self) -> str:
        """Patient P-0012 · lesion L1 (left forearm)"""
        site = f" ({self.site})" if self.site else ""
        return f"Patient {self.patient} · lesion {self.lesion}{site}"

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CaseSummary:
        risk = body.get("latest_risk")
        diagnosis = body.get("diagnosis")
        if isinstance(diagnosis, Mapping):  # the newest diagnosis as an object
            diagnosis = diagnosis.get("label")
        return cls(
            case_id=str(body["case_id"]),
            patient=str(body["patient"]),
            lesion=str(body["lesion"]),
            site=str(body.get("site") or ""),
            created_at=_time(body.get("created_at")),
            created_by=str(body.get("created_by") or ""),
            image_count=int(body.get("image_count") or 0),
            last_taken_at=_time(body.get("last_taken_at")),
            latest_risk=None if risk is None else float(risk),
            latest_traffic_light=str(body.get("latest_traffic_light") or "unknown"),
            diagnosis=str(diagnosis) if diagnosis else None,
        )


@dataclass(frozen=True)
class CaseList:
    cases: tuple[CaseSummary, ...]
    total: int

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CaseList:
        cases = tuple(CaseSummary.from_json(item) for item in body.get("cases") or ())
        return cls(cases, int(body.get("total", len(cases))))


@dataclass(frozen=True)
class CaseImage:
    """One visit's image and the answer the server stored for it at upload."""

    image_id: str
    sha256: str
    taken_at: dt.datetime | None
    uploaded_at: dt.datetime | None
    uploaded_by: str
    filename: str
    answer: Classification  # its model version is the file that answered

    @property
    def model_text(self) -> str:
        """Model `default` · sha256 3f2a9c1b0d4e"""
        version = self.answer.model
        digest = f" · sha256 {version.sha256[:12]}" if version and version.sha256 else ""
        return f"Model `{self.answer.model_id}`{digest}"

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CaseImage:
        answer = dict(body["answer"])
        model = answer.get("model") if isinstance(answer.get("model"), Mapping) else {}
        answer.setdefault("model_id", model.get("id", ""))
        return cls(
            image_id=str(body["image_id"]),
            sha256=str(body.get("sha256") or ""),
            taken_at=_time(body.get("taken_at")),
            uploaded_at=_time(body.get("uploaded_at")),
            uploaded_by=str(body.get("uploaded_by") or ""),
            filename=str(body.get("filename") or ""),
            answer=Classification.from_json(answer),
        )


@dataclass(frozen=True)
class CaseDetail:
    """A case page (`GET /v1/cases/{id}`): summary, images in time order, diagnoses."""

    summary: CaseSummary
    images: tuple[CaseImage, ...]
    diagnoses: tuple[Diagnosis, ...]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CaseDetail:
        return cls(
            summary=CaseSummary.from_json(body),
            images=tuple(CaseImage.from_json(item) for item in body.get("images") or ()),
            diagnoses=tuple(Diagnosis.from_json(item) for item in body.get("diagnoses") or ()),
        )

    def risk_rows(self) -> list[dict[str, Any]]:
        """The risk per visit for the chart: accepted images only (a refused image has no
        score), in time order."""
        return [
            {
                "Taken": image.taken_at,
                "Risk score": image.answer.risk,
                "Light": image.answer.traffic_light,
                "Image": image.filename,
            }
            for image in self.images
            if image.answer.risk is not None and image.taken_at is not None
        ]


@dataclass(frozen=True)
class AuditEvent:
    at: dt.datetime | None
    account: str
    action: str
    case_id: str
    image_id: str
    image_sha256: str
    model: str
    detail: str

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> AuditEvent:
        model = body.get("model") or {}
        digest = str(model.get("sha256") or "")[:12]
        detail = body.get("detail")
        return cls(
            at=_time(body.get("at")),
            account=str(body.get("account") or ""),
            action=str(body.get("action") or ""),
            case_id=str(body.get("case_id") or ""),
            image_id=str(body.get("image_id") or ""),
            image_sha256=str(body.get("image_sha256") or "")[:12],
            model=f"{model.get('id', '')} ({digest})" if model else "",
            detail=_detail_text(detail),
        )


def _detail_text(detail: Any) -> str:
    """An event's detail as one line: `traffic_light: green · gate_accepted: True`."""
    if isinstance(detail, Mapping):
        return " · ".join(f"{key}: {value}" for key, value in detail.items() if value is not None)
    return "" if detail is None else str(detail)


def audit_rows(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """`GET /v1/audit` as table rows, newest first (as the server sends them)."""
    events: Sequence[Mapping[str, Any]] = body.get("events") or ()
    return [
        {
            "At (UTC)": when(event.at),
            "Account": event.account,
            "Action": event.action,
            "Case": event.case_id,
            "Image": event.image_id,
            "Image sha256": event.image_sha256,
            "Model": event.model,
            "Detail": event.detail,
        }
        for event in map(AuditEvent.from_json, events)
    ]
