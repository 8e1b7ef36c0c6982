"""The dashboard's uploads folder: images under generated names, checked before they are kept.

Each upload becomes `<id>.jpg|.png` (id = 32 hex digits; the extension follows the real format,
not the user's name), a `<id>.thumb.jpg` for the gallery and a `<id>.json` sidecar with the
original name, size, pixel size, hash and upload time. The user's file name is only ever
shown, never used as a path. The same bytes uploaded twice are kept once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageOps

from dermanet.paths import PROJECT_ROOT
from dermanet.storage import atomic_write

UPLOAD_DIR_ENV = "DERMANET_UPLOAD_DIR"
MAX_UPLOAD_MB_ENV = "DERMANET_UPLOAD_MAX_MB"
DEFAULT_UPLOAD_DIR = PROJECT_ROOT / "uploads"
DEFAULT_MAX_BYTES = 20 * 1024 * 1024  # the server's default request limit
MAX_PIXELS = 40_000_000  # the server's default per-image limit
ALLOWED_EXTENSIONS = (".jpg", ".jpeg", ".png")
FORMAT_SUFFIX = {"JPEG": ".jpg", "PNG": ".png"}
THUMB_SIDE = 320
_ID = re.compile(r"^[0-9a-f]{32}$")


class UploadRejected(ValueError):
    """An upload that is not kept; the message names the file and what to do."""


@dataclass(frozen=True)
class StoredImage:
    """One kept upload (paths are server-side, never derived from the user's name)."""

    image_id: str
    original_name: str
    stored_name: str
    size_bytes: int
    width: int
    height: int
    image_format: str
    sha256: str
    uploaded_at: str  # ISO 8601, UTC

    @property
    def mime(self) -> str:
        return "image/png" if self.image_format == "PNG" else "image/jpeg"


def display_name(name: str, limit: int = 80) -> str:
    """The user's file name made safe to show: no folders, no control characters, bounded."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    if len(base) > limit:
        stem, dot, ext = base.rpartition(".")
        base = (stem[: limit - len(ext) - 2] + "…" + dot + ext) if dot else base[:limit]
    return base or "image"


class UploadStore:
    """A folder of uploaded images (default $DERMANET_UPLOAD_DIR, else `uploads/`)."""

    def __init__(
        self,
        root: str | Path | None = None,
        max_bytes: int | None = None,
        max_pixels: int = MAX_PIXELS,
    ):
        self.root = Path(root or os.environ.get(UPLOAD_DIR_ENV) or DEFAULT_UPLOAD_DIR)
        self.root = self.root.expanduser().resolve()
        self.max_bytes = int(max_bytes or _env_max_bytes(os.environ))
        self.max_pixels = int(max_pixels)

    def __repr__(self) -> str:
        return f"UploadStore({str(self.root)!r}, max_bytes={self.max_bytes})"

    def for_account(self, name: str) -> UploadStore:
        """This store's folder for one account (`<root>/<safe name>-<hash>`): the single-image
        page of one user never lists another user's uploads."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:40] or "account"
        digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
        return UploadStore(self.root / f"{safe}-{digest}", self.max_bytes, self.max_pixels)

    # --- writing -------------------------------------------------------------------------------
    def save(self, name: str, data: bytes) -> StoredImage:
        """Check and keep one upload; the same bytes again return the image already kept."""
        shown = display_name(name)
        suffix = Path(shown).suffix.lower()
        if suffix not in ALLOWED_EXTENSIONS:
            raise UploadRejected(
                f"{shown}: only {', '.join(ALLOWED_EXTENSIONS)} images are accepted"
            )
        if not data:
            raise UploadRejected(f"{shown}: the file is empty (0 bytes)")
        if len(data) > self.max_bytes:
            raise UploadRejected(
                f"{shown}: {len(data) / 2**20:.1f} MB is over the upload limit of "
                f"{self.max_bytes / 2**20:.1f} MB; export a smaller JPEG"
            )
        digest = hashlib.sha256(data).hexdigest()
        for existing in self.list():
            if existing.sha256 == digest:
                return existing
        image_format, width, height, thumb = self._inspect(shown, data)
        image_id = uuid.uuid4().hex
        stored = StoredImage(
            image_id=image_id,
            original_name=shown,
            stored_name=image_id + FORMAT_SUFFIX[image_format],
            size_bytes=len(data),
            width=width,
            height=height,
            image_format=image_format,
            sha256=digest,
            uploaded_at=dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        )
        self.root.mkdir(parents=True, exist_ok=True)
        sidecar = json.dumps(asdict(stored)).encode()
        for name, content in ((stored.stored_name, data), (f"{image_id}.thumb.jpg", thumb),
                              (f"{image_id}.json", sidecar)):  # fmt: skip
            # uploads may be patients' images: readable by this user only
            atomic_write(self.root / name, content, mode=0o600)
        return stored

    def remove(self, image_id: str) -> bool:
        """Delete an image with its thumbnail and sidecar; False when it was not there."""
        stored = self.get(image_id)
        if stored is None:
            return False
        for name in (stored.stored_name, f"{image_id}.thumb.jpg", f"{image_id}.json"):
            (self.root / name).unlink(missing_ok=True)
        return True

    # --- reading -------------------------------------------------------------------------------
    def list(self) -> list[StoredImage]:
        """Every kept image, newest first (sidecars that cannot be read are skipped)."""
        if not self.root.is_dir():
            return []
        images = []
        for sidecar in self.root.glob("*.json"):
            stored = self._load(sidecar.stem)
            if stored is not None:
                images.append(stored)
        return sorted(images, key=lambda s: (s.uploaded_at, s.image_id), reverse=True)

    def get(self, image_id: str) -> StoredImage | None:
        if not _ID.match(str(image_id)):
            return None
        return self._load(image_id)

    def read(self, image_id: str) -> bytes:
        stored = self._require(image_id)
        return (self.root / stored.stored_name).read_bytes()

    def thumbnail(self, image_id: str) -> bytes:
        self._require(image_id)
        path = self.root / f"{image_id}.thumb.jpg"
        return path.read_bytes() if path.is_file() else self.read(image_id)

    # --- helpers -------------------------------------------------------------------------------
    def _require(self, image_id: str) -> StoredImage:
        stored = self.get(image_id)
        if stored is None:
            raise KeyError(f"no uploaded image with id {image_id!r} in {self.root}")
        return stored

    def _load(self, image_id: str) -> StoredImage | None:
        if not _ID.match(image_id):
            return None
        try:
            data = json.loads((self.root / f"{image_id}.json").read_text())
            stored = StoredImage(**data)
        except (OSError, ValueError, TypeError):
            return None
        if stored.image_id != image_id or not (self.root / stored.stored_name).is_file():
            return None
        return stored

    def _inspect(self, shown: str, data: bytes) -> tuple[str, int, int, bytes]:
        """(format, width, height, JPEG thumbnail) of a real JPEG/PNG within the pixel limit."""
        try:
            with Image.open(io.BytesIO(data)) as probe:
                image_format = probe.format or ""
                width, height = probe.size
        except Exception:
            raise UploadRejected(f"{shown}: not a readable JPEG or PNG image") from None
        if image_format not in FORMAT_SUFFIX:
            kind = image_format or "unknown"
            raise UploadRejected(f"{shown}: the file is {kind}, not JPEG or PNG")
        if width * height > self.max_pixels:
            raise UploadRejected(
                f"{shown}: {width}×{height} pixels is over the limit of "
                f"{self.max_pixels / 1e6:.0f} megapixels; downscale it first"
            )
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                image = ImageOps.exif_transpose(image).convert("RGB")
                image.thumbnail((THUMB_SIDE, THUMB_SIDE))
                out = io.BytesIO()
                image.save(out, format="JPEG", quality=85)
        except Exception:
            raise UploadRejected(f"{shown}: the image is damaged or truncated") from None
        return image_format, width, height, out.getvalue()


def _env_max_bytes(env: Mapping[str, str]) -> int:
    raw = env.get(MAX_UPLOAD_MB_ENV)
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{MAX_UPLOAD_MB_ENV}={raw!r} is not a number of megabytes") from None
    if value <= 0:
        raise ValueError(f"{MAX_UPLOAD_MB_ENV} must be positive, got {raw!r}")
    return int(value * 2**20)
