"""Cases: a patient's lesion followed over time by its images, each with the classify answer it
got, confirmed by diagnoses; every change leaves an audit event.

Plain functions over a SQLAlchemy session, so the HTTP routes stay thin and tests and jobs
(the export) use the same rules. Errors carry the HTTP status they deserve.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dermanet.accounts.store import Principal
from dermanet.classes import CLASS_NAMES
from dermanet.db.models import (
    METHODS,
    NAME_LENGTH,
    NOTE_LENGTH,
    Account,
    Answer,
    AuditEvent,
    Diagnosis,
    Image,
    Lesion,
    Patient,
    utcnow,
)
from dermanet.storage import atomic_write

MAX_LIMIT = 1000
FILENAME_LENGTH = 255


class CaseError(Exception):
    """A request the cases rules refuse; `status` is the HTTP status it deserves."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(what: str) -> CaseError:
    return CaseError(404, f"{what} not found (unknown, or deleted)")


# ---------------------------------------------------------------- checking what people send


def pseudonym(value: Any, field: str, required: bool = True) -> str | None:
    """A stripped pseudonym or site: 1..64 characters (site: may be empty/None)."""
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise CaseError(422, f"{field} must be text")
    value = value.strip()
    if not value and not required:
        return None
    if not 1 <= len(value) <= NAME_LENGTH:
        raise CaseError(422, f"{field} must be 1 to {NAME_LENGTH} characters, got {len(value)}")
    return value


def parse_time(value: str | None, field: str = "taken_at") -> datetime:
    """ISO 8601 date or datetime (no zone: UTC); None or empty: now."""
    if value is None or not str(value).strip():
        return utcnow()
    text = str(value).strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.combine(date.fromisoformat(text), datetime.min.time(), UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CaseError(
            422, f"{field} {text!r} is not an ISO 8601 date or time (e.g. 2026-03-01)"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_since(value: str | None) -> datetime | None:
    """`7d`, `24h`, `30m` before now, or an ISO 8601 date/time; None: no bound."""
    if value is None or not value.strip():
        return None
    match = re.fullmatch(r"\s*(\d+)\s*([dhm])\s*", value)
    if match:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
        return utcnow() - timedelta(**{unit: int(match.group(1))})
    return parse_time(value, "since")


def check_limit(limit: int, offset: int = 0) -> None:
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise CaseError(422, f"limit must be 1..{MAX_LIMIT} and offset >= 0")


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# ---------------------------------------------------------------- audit


def audit(
    session: Session,
    who: Principal | None,
    action: str,
    *,
    case_id: int | None = None,
    image_id: int | None = None,
    image_sha256: str | None = None,
    model: tuple[str | None, str | None] = (None, None),
    detail: dict[str, Any] | None = None,
) -> None:
    """Add an audit event to the session's transaction: it commits with what it records."""
    session.add(
        AuditEvent(
            account=who.name if who else None,
            action=action,
            case_id=case_id,
            image_id=image_id,
            image_sha256=image_sha256,
            model_id=model[0],
            model_sha256=model[1],
            detail=detail,
        )
    )


def answer_model(answer: dict[str, Any]) -> tuple[str | None, str | None]:
    """(model id, model file SHA-256) of a classify answer (the sha only when it carries one)."""
    model = answer.get("model")
    if isinstance(model, dict):
        return model.get("id") or answer.get("model_id"), model.get("sha256")
    return answer.get("model_id"), None


def audit_classify(
    session: Session, who: Principal, images: Sequence[bytes], answers: Sequence[dict[str, Any]]
) -> None:
    """One event per classified image: who, which model, which image (by SHA-256 only)."""
    for data, answer in zip(images, answers, strict=True):
        audit(
            session,
            who,
            "classify",
            image_sha256=hashlib.sha256(data).hexdigest(),
            model=answer_model(answer),
            detail={"traffic_light": answer.get("traffic_light")},
        )


def audit_events(session: Session, since: str | None, limit: int) -> list[dict[str, Any]]:
    check_limit(limit)
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    start = parse_since(since)
    if start is not None:
        query = query.where(AuditEvent.at >= start)
    return [
        {
            "at": iso(event.at),
            "account": event.account,
            "action": event.action,
            "case_id": event.case_id,
            "image_id": event.image_id,
            "image_sha256": event.image_sha256,
            "model": (
                {"id": event.model_id, "sha256": event.model_sha256} if event.model_id else None
            ),
            "detail": event.detail,
        }
        for event in session.scalars(query)
    ]


# ---------------------------------------------------------------- cases


def create_case(
    session: Session, who: Principal, patient: Any, lesion: Any, site: Any = None
) -> dict[str, Any]:
    patient_name = pseudonym(patient, "patient")
    lesion_name = pseudonym(lesion, "lesion")
    site_name = pseudonym(site, "site", required=False)
    person = _patient(session, patient_name)
    existing = _live_case(session, person.id, lesion_name)
    if existing is not None:
        raise _duplicate(existing, patient_name, lesion_name)
    case = Lesion(
        patient_id=person.id, pseudonym=lesion_name, site=site_name, created_by=who.account_id
    )
    try:
        with session.begin_nested():
            session.add(case)
    except IntegrityError:  # the same case created by another request in the meantime
        existing = _live_case(session, person.id, lesion_name)
        raise _duplicate(existing, patient_name, lesion_name) from None
    audit(session, who, "case.create", case_id=case.id)
    return _summaries(session, [case])[0]


def _patient(session: Session, name: str) -> Patient:
    """The patient of that pseudonym, added when new (a concurrent add wins, then is used)."""
    found = session.scalar(select(Patient).where(Patient.pseudonym == name))
    if found is not None:
        return found
    person = Patient(pseudonym=name)
    try:
        with session.begin_nested():
            session.add(person)
    except IntegrityError:
        return session.scalars(select(Patient).where(Patient.pseudonym == name)).one()
    return person


def _live_case(session: Session, patient_id: int, lesion: str) -> Lesion | None:
    return session.scalar(
        select(Lesion).where(
            Lesion.patient_id == patient_id, Lesion.pseudonym == lesion, Lesion.deleted_at.is_(None)
        )
    )


def _duplicate(existing: Lesion | None, patient: str, lesion: str) -> CaseError:
    case_id = existing.id if existing else "?"
    return CaseError(
        409,
        f"patient {patient!r} already has a case for lesion {lesion!r}: case_id {case_id}; add "
        "the image to that case instead",
    )


def live_case(session: Session, case_id: int) -> Lesion:
    case = session.get(Lesion, case_id)
    if case is None or case.deleted_at is not None:
        raise not_found(f"case {case_id}")
    return case


def list_cases(
    session: Session, patient: str | None = None, limit: int = 50, offset: int = 0
) -> dict[str, Any]:
    check_limit(limit, offset)
    where = [Lesion.deleted_at.is_(None)]
    if patient and patient.strip():
        text = patient.strip().lower()
        where.append(func.lower(Patient.pseudonym).contains(text, autoescape=True))
    base = select(Lesion).join(Patient, Lesion.patient_id == Patient.id).where(*where)
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    page = session.scalars(
        base.order_by(Lesion.last_activity_at.desc(), Lesion.id.desc()).limit(limit).offset(offset)
    ).all()
    return {"cases": _summaries(session, list(page)), "total": int(total)}


def get_case(session: Session, case_id: int) -> dict[str, Any]:
    case = live_case(session, case_id)
    summary = _summaries(session, [case])[0]
    images = _live_images(session, [case.id]).get(case.id, [])
    summary["images"] = [image_view(image) for image in images]
    summary["diagnoses"] = [
        diagnosis_view(d, name)
        for d, name in session.execute(
            select(Diagnosis, Account.name)
            .join(Account, Diagnosis.by == Account.id)
            .where(Diagnosis.lesion_id == case.id)
            .order_by(Diagnosis.at, Diagnosis.id)
        )
    ]
    return summary


def delete_case(session: Session, who: Principal, case_id: int) -> dict[str, Any]:
    case = live_case(session, case_id)
    if case.created_by != who.account_id and not who.is_admin:
        raise CaseError(403, "only the case's creator or an admin can delete it")
    case.deleted_at, case.deleted_by = utcnow(), who.account_id
    audit(session, who, "case.delete", case_id=case.id)
    return {"deleted": True}


def _live_images(session: Session, case_ids: list[int]) -> dict[int, list[Image]]:
    """Each case's images that are not deleted, in time order (taken, then uploaded)."""
    found: dict[int, list[Image]] = {}
    if not case_ids:
        return found
    rows = session.scalars(
        select(Image)
        .where(Image.lesion_id.in_(case_ids), Image.deleted_at.is_(None))
        .order_by(Image.taken_at, Image.uploaded_at, Image.id)
    )
    for image in rows:
        found.setdefault(image.lesion_id, []).append(image)
    return found


def _latest_diagnoses(session: Session, case_ids: list[int]) -> dict[int, dict[str, Any]]:
    latest: dict[int, dict[str, Any]] = {}
    if not case_ids:
        return latest
    rows = session.execute(
        select(Diagnosis, Account.name)
        .join(Account, Diagnosis.by == Account.id)
        .where(Diagnosis.lesion_id.in_(case_ids))
        .order_by(Diagnosis.at, Diagnosis.id)
    )
    for diagnosis, name in rows:
        latest[diagnosis.lesion_id] = diagnosis_view(diagnosis, name)
    return latest


def _summaries(session: Session, cases: list[Lesion]) -> list[dict[str, Any]]:
    ids = [case.id for case in cases]
    images = _live_images(session, ids)
    diagnoses = _latest_diagnoses(session, ids)
    summaries = []
    for case in cases:
        own = images.get(case.id, [])
        last = own[-1] if own else None
        answer = last.answer if last is not None else None
        summaries.append(
            {
                "case_id": case.id,
                "patient": case.patient.pseudonym,
                "lesion": case.pseudonym,
                "site": case.site,
                "created_at": iso(case.created_at),
                "created_by": case.creator.name,
                "image_count": len(own),
                "last_taken_at": iso(last.taken_at) if last else None,
                "latest_risk": answer.risk if answer else None,
                "latest_traffic_light": answer.traffic_light if answer else None,
                "diagnosis": diagnoses.get(case.id),
            }
        )
    return summaries


# ---------------------------------------------------------------- images


def image_view(image: Image) -> dict[str, Any]:
    return {
        "image_id": image.id,
        "sha256": image.sha256,
        "taken_at": iso(image.taken_at),
        "uploaded_at": iso(image.uploaded_at),
        "uploaded_by": image.uploader.name,
        "filename": image.filename,
        "answer": image.answer.answer if image.answer else None,
    }


def content_type_of(data: bytes, declared: str | None) -> str:
    """The stored image's content type: what its bytes say, else the declared image type."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if declared and declared.lower().startswith("image/"):
        return declared.lower()[:100]
    return "application/octet-stream"


def store_file(images_root: Path, data: bytes) -> tuple[str, str]:
    """Write the bytes content-addressed (`ab/abcdef…`, private mode) once; (sha256, path
    relative to the data folder). Written before the database row, so a row never names a
    missing file; a crash in between leaves only an unreferenced file."""
    digest = hashlib.sha256(data).hexdigest()
    relative = Path(images_root.name) / digest[:2] / digest
    target = images_root / digest[:2] / digest
    if not target.is_file() or target.stat().st_size != len(data):
        atomic_write(target, data, mode=0o600)
    return digest, relative.as_posix()


@dataclass(frozen=True)
class NewImage:
    data: bytes
    filename: str
    content_type: str | None
    taken_at: datetime


def add_image(
    session: Session,
    who: Principal,
    case_id: int,
    image: NewImage,
    answer: dict[str, Any],
    images_root: Path,
) -> dict[str, Any]:
    """Store an image of a case with the answer it got, and audit it, in one transaction
    (the caller commits). Returns the answer with `image_id` and `case_id`."""
    case = live_case(session, case_id)
    digest, path = store_file(images_root, image.data)
    row = Image(
        lesion_id=case.id,
        sha256=digest,
        path=path,
        filename=(image.filename or "image")[:FILENAME_LENGTH],
        content_type=content_type_of(image.data, image.content_type),
        taken_at=image.taken_at,
        uploaded_by=who.account_id,
    )
    session.add(row)
    session.flush()
    model_id, model_sha = answer_model(answer)
    gate = answer.get("gate") if isinstance(answer.get("gate"), dict) else {}
    risk = answer.get("risk")
    session.add(
        Answer(
            image_id=row.id,
            model_id=str(model_id or "unknown"),
            model_sha256=model_sha,
            answer=answer,
            gate_accepted=gate.get("accepted"),
            prediction_set=answer.get("prediction_set"),
            risk=float(risk) if isinstance(risk, int | float) else None,
            traffic_light=answer.get("traffic_light"),
        )
    )
    case.last_activity_at = utcnow()
    audit(
        session,
        who,
        "image.upload",
        case_id=case.id,
        image_id=row.id,
        image_sha256=digest,
        model=(model_id, model_sha),
        detail={
            "traffic_light": answer.get("traffic_light"),
            "gate_accepted": gate.get("accepted"),
        },
    )
    return {**answer, "image_id": row.id, "case_id": case.id}


def live_image(session: Session, case_id: int, image_id: int) -> Image:
    live_case(session, case_id)
    image = session.get(Image, image_id)
    if image is None or image.lesion_id != case_id or image.deleted_at is not None:
        raise not_found(f"image {image_id} of case {case_id}")
    return image


def delete_image(session: Session, who: Principal, case_id: int, image_id: int) -> dict[str, Any]:
    image = live_image(session, case_id, image_id)
    if image.uploaded_by != who.account_id and not who.is_admin:
        raise CaseError(403, "only the image's uploader or an admin can delete it")
    image.deleted_at, image.deleted_by = utcnow(), who.account_id
    audit(
        session, who, "image.delete", case_id=case_id, image_id=image.id, image_sha256=image.sha256
    )
    return {"deleted": True}


# ---------------------------------------------------------------- diagnoses


def diagnosis_view(diagnosis: Diagnosis, by: str) -> dict[str, Any]:
    return {
        "diagnosis_id": diagnosis.id,
        "label": diagnosis.label,
        "method": diagnosis.method,
        "note": diagnosis.note,
        "by": by,
        "at": iso(diagnosis.at),
    }


def add_diagnosis(
    session: Session, who: Principal, case_id: int, label: Any, method: Any, note: Any = ""
) -> dict[str, Any]:
    case = live_case(session, case_id)
    if label not in CLASS_NAMES:
        raise CaseError(422, f"label {label!r}: use one of {', '.join(CLASS_NAMES)}")
    if method not in METHODS:
        raise CaseError(422, f"method {method!r}: use one of {', '.join(METHODS)}")
    note = "" if note is None else note
    if not isinstance(note, str) or len(note) > NOTE_LENGTH:
        raise CaseError(422, f"note must be text of at most {NOTE_LENGTH} characters")
    diagnosis = Diagnosis(
        lesion_id=case.id, label=label, method=method, note=note, by=who.account_id
    )
    session.add(diagnosis)
    case.last_activity_at = utcnow()
    session.flush()
    audit(
        session,
        who,
        "diagnosis.add",
        case_id=case.id,
        detail={"diagnosis_id": diagnosis.id, "label": label, "method": method},
    )
    return diagnosis_view(diagnosis, who.name)
