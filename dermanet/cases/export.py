"""The confirmed cases as a plain catalogue (`image,label,lesion_id,anatom_site,...` + an image
folder), so a clinic scores the model on its own patients with the jobs it already has
(`jobs/evaluate.py --split all`, `jobs/compare.py`, `jobs/train.py`), unchanged.

A case is confirmed when it has a diagnosis; its latest diagnosis labels every live image of
it. One case is one lesion, so `lesion_id` keeps a lesion's visits together in splits and in
the bootstrap. Pseudonyms stay in the database: the catalogue names cases by number only.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dermanet.cases import iso
from dermanet.db.config import data_dir, database_url
from dermanet.db.engine import make_engine, session_factory
from dermanet.db.migrate import SchemaOutdated, check_current
from dermanet.db.models import Diagnosis, Image, Lesion
from dermanet.storage import atomic_write

COLUMNS = (
    "image",
    "label",
    "lesion_id",
    "anatom_site",
    "method",
    "diagnosed_at",
    "taken_at",
    "gate_accepted",
    "model_id",
    "model_sha256",
)
SUFFIXES = {"image/jpeg": ".jpg", "image/png": ".png"}  # what the catalogue readers index


class ExportError(ValueError):
    """Nothing to export, or the output cannot be written; the message says what to do."""


@dataclass(frozen=True)
class ExportSummary:
    cases: int
    images: int
    labels: dict[str, int]


def confirmed_rows(session: Session) -> list[tuple[dict[str, str], Image]]:
    """(catalogue row, image) for every live image of every live case with a diagnosis."""
    latest: dict[int, Diagnosis] = {}
    for diagnosis in session.scalars(
        select(Diagnosis)
        .join(Lesion, Diagnosis.lesion_id == Lesion.id)
        .where(Lesion.deleted_at.is_(None))
        .order_by(Diagnosis.at, Diagnosis.id)
    ):
        latest[diagnosis.lesion_id] = diagnosis
    if not latest:
        return []
    images = session.scalars(
        select(Image)
        .where(Image.lesion_id.in_(latest), Image.deleted_at.is_(None))
        .order_by(Image.lesion_id, Image.taken_at, Image.uploaded_at, Image.id)
    )
    rows = []
    for image in images:
        diagnosis = latest[image.lesion_id]
        answer = image.answer
        rows.append(
            (
                {
                    "image": f"case{image.lesion_id}_image{image.id}",
                    "label": diagnosis.label,
                    "lesion_id": f"case{image.lesion_id}",
                    "anatom_site": session.get(Lesion, image.lesion_id).site or "",
                    "method": diagnosis.method,
                    "diagnosed_at": iso(diagnosis.at) or "",
                    "taken_at": iso(image.taken_at) or "",
                    "gate_accepted": _text(answer.gate_accepted if answer else None),
                    "model_id": answer.model_id if answer else "",
                    "model_sha256": (answer.model_sha256 or "") if answer else "",
                },
                image,
            )
        )
    return rows


def _text(value: bool | None) -> str:
    return "" if value is None else str(value).lower()


def export_confirmed(session: Session, data_dir: Path, output: Path, images: Path) -> ExportSummary:
    """Write the catalogue CSV and one file per image (`<image>.jpg|.png`; other formats are
    converted to PNG). Files are written before the CSV that names them, each atomically."""
    rows = confirmed_rows(session)
    if not rows:
        raise ExportError(
            "no confirmed cases to export: record a diagnosis on a case first "
            "(POST /v1/cases/{case_id}/diagnosis, or the dashboard's case page)"
        )
    images.mkdir(parents=True, exist_ok=True)
    for row, image in rows:
        source = data_dir / image.path
        if not source.is_file():
            raise ExportError(
                f"case {image.lesion_id} image {image.id}: its file {source} is missing; "
                "restore the data folder from its backup"
            )
        data = source.read_bytes()
        suffix = SUFFIXES.get(image.content_type)
        if suffix is None:
            data, suffix = _as_png(data), ".png"
        atomic_write(images / f"{row['image']}{suffix}", data, mode=0o600)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(row for row, _ in rows)
    atomic_write(output, buffer.getvalue().encode(), mode=0o600)
    labels: dict[str, int] = {}
    for row, _ in rows:
        labels[row["label"]] = labels.get(row["label"], 0) + 1
    return ExportSummary(len({row["lesion_id"] for row, _ in rows}), len(rows), labels)


def _as_png(data: bytes) -> bytes:
    with PILImage.open(io.BytesIO(data)) as picture:
        out = io.BytesIO()
        picture.convert("RGB").save(out, format="PNG")
    return out.getvalue()


def run_export(
    output: str | Path, images: str | Path, url: str | None = None, folder: str | None = None
) -> ExportSummary:
    """`jobs/export_cases.py`: the configured database (or `url`) and data folder, read in
    one transaction so the catalogue is one consistent moment of the database."""
    url = database_url(url, folder)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise ExportError(
            f"no database at {parsed.database}: give the server's data folder (--data-dir, "
            "$DERMANET_DATA_DIR) or its --database-url"
        )
    try:
        check_current(make_engine(url))
        with session_factory(url).begin() as session:
            return export_confirmed(session, data_dir(folder), Path(output), Path(images))
    except (SchemaOutdated, SQLAlchemyError) as exc:
        raise ExportError(str(exc).splitlines()[0]) from None
