"""HTTP routes of cases, diagnoses, the audit and `/v1/me`: thin over `dermanet.cases`.

Database work runs in FastAPI's threadpool (sync SQLAlchemy); an upload is classified by the
replica's own classify route, then its file, answer and audit event are committed before the
201 goes out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from dermanet import cases
from dermanet.accounts.store import Principal
from dermanet.serving.auth import AuthMiddleware, principal, require_admin
from dermanet.serving.cases_context import current
from dermanet.serving.uploads import FILE_FIELD, Upload, check_sizes, read_uploads

router = APIRouter(prefix="/v1")
AUDITED = "audited"  # request.state flag: this request's audit is written by its route
T = TypeVar("T")
Caller = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(require_admin)]


class CaseIn(BaseModel):
    patient: str
    lesion: str
    site: str | None = None


class DiagnosisIn(BaseModel):
    label: str
    method: str
    note: str = ""


def _write(work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction; committed when it returns."""
    with current().sessions.begin() as session:
        return work(session)


def _read(work: Callable[[Session], T]) -> T:
    with current().sessions() as session:
        return work(session)


async def _case_error(request: Request, exc: cases.CaseError) -> JSONResponse:
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


def install(api: FastAPI) -> None:
    """Wire the key check, these routes and their error handler into the ingress app."""
    api.add_middleware(AuthMiddleware)
    api.add_exception_handler(cases.CaseError, _case_error)
    api.include_router(router)


async def audit_classify(request: Request, uploads: list[Upload], answers: list[Any]) -> None:
    """Audit a /v1/classify answer (account, model, image SHA-256); committed before the
    answer goes out. Skipped when a cases route classifies on its own behalf."""
    if getattr(request.state, AUDITED, False):
        return
    who = principal(request)
    images = [upload.data for upload in uploads]
    await run_in_threadpool(_write, lambda s: cases.audit_classify(s, who, images, answers))


@router.get("/me", summary="The signed-in account")
def me(who: Caller) -> dict[str, str]:
    return {"name": who.name, "role": who.role}


@router.post("/cases", status_code=201, summary="Open a case: one lesion of one patient")
def create_case(body: CaseIn, who: Caller) -> dict[str, Any]:
    return _write(lambda s: cases.create_case(s, who, body.patient, body.lesion, body.site))


@router.get("/cases", summary="Cases, newest activity first")
def list_cases(
    who: Caller,
    patient: str | None = Query(None, description="case-insensitive part of the pseudonym"),
    limit: int = Query(50, ge=1, le=cases.MAX_LIMIT),
    offset: int = Query(0, ge=0),
) -> dict[str, Any]:
    return _read(lambda s: cases.list_cases(s, patient, limit, offset))


@router.get("/cases/{case_id}", summary="A case with its images, answers and diagnoses")
def get_case(case_id: int, who: Caller) -> dict[str, Any]:
    return _read(lambda s: cases.get_case(s, case_id))


@router.delete("/cases/{case_id}", summary="Delete a case (its creator or an admin)")
def delete_case(case_id: int, who: Caller) -> dict[str, Any]:
    return _write(lambda s: cases.delete_case(s, who, case_id))


@router.post(
    "/cases/{case_id}/images",
    status_code=201,
    summary="Add an image to a case: classified, stored with its answer, audited",
)
async def upload_image(case_id: int, request: Request) -> JSONResponse:
    who = principal(request)
    await run_in_threadpool(_read, lambda s: cases.live_case(s, case_id))  # 404 first
    uploads, form = await read_uploads(request, max_files=1)
    check_sizes(uploads, max_files=1)
    taken_at = cases.parse_time(form.get("taken_at") if form is not None else None)
    sent = form.get(FILE_FIELD) if form is not None else None
    declared = (
        sent.content_type if isinstance(sent, UploadFile) else request.headers.get("content-type")
    )
    if form is not None:  # classify reads the same (cached) form: its files from the start
        for item in form.getlist(FILE_FIELD):
            if isinstance(item, UploadFile):
                await item.seek(0)
    setattr(request.state, AUDITED, True)
    answer = await current().classify(request)
    image = cases.NewImage(uploads[0].data, uploads[0].filename, declared, taken_at)
    root = current().images_root
    stored = await run_in_threadpool(
        _write, lambda s: cases.add_image(s, who, case_id, image, answer, root)
    )
    return JSONResponse(stored, status_code=201)


@router.get("/cases/{case_id}/images/{image_id}/file", summary="The stored image file")
def image_file(case_id: int, image_id: int, who: Caller) -> FileResponse:
    image = _read(lambda s: cases.live_image(s, case_id, image_id))
    path = current().images_root.parent / image.path
    return FileResponse(path, media_type=image.content_type)


@router.delete("/cases/{case_id}/images/{image_id}", summary="Delete an image (uploader/admin)")
def delete_image(case_id: int, image_id: int, who: Caller) -> dict:
    return _write(lambda s: cases.delete_image(s, who, case_id, image_id))


@router.post("/cases/{case_id}/diagnosis", status_code=201, summary="Record a diagnosis")
def add_diagnosis(case_id: int, body: DiagnosisIn, who: Caller) -> dict[str, Any]:
    return _write(
        lambda s: cases.add_diagnosis(s, who, case_id, body.label, body.method, body.note)
    )


@router.get("/audit", summary="Audit events, newest first (admins)")
def audit(
    who: Admin,
    since: str | None = Query(None, description="ISO 8601 time, or 7d / 24h / 30m ago"),
    limit: int = Query(200, ge=1, le=cases.MAX_LIMIT),
) -> dict[str, Any]:
    return {"events": _read(lambda s: cases.audit_events(s, since, limit))}
