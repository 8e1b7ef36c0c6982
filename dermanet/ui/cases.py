"""Pictures of similar confirmed cases: the index's own thumbnail, else the data folder's image.

An index may be shipped without thumbnails (to fit the repository); the dashboard then shows
the case's image from derm-sample (`$DERMANET_SAMPLE_DIR`) when that folder is on this computer,
shrunk to a thumbnail, and text only when it is not.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from dermanet.paths import sample_dir
from dermanet.ui.client import SimilarCase

THUMBNAIL_PX = 96
EXTENSIONS = (".jpg", ".jpeg", ".png")


def case_thumbnails(
    cases: Sequence[SimilarCase], images_dir: Path | None = None
) -> list[bytes | None]:
    """One JPEG per case (None: no picture anywhere), in the cases' order."""
    folder = images_dir if images_dir is not None else sample_dir() / "images"
    return [case.thumbnail or folder_thumbnail(folder, case.image) for case in cases]


@functools.lru_cache(maxsize=256)
def folder_thumbnail(folder: Path, image_id: str) -> bytes | None:
    """The centre square of `<folder>/<image id>.jpg|.jpeg|.png` as a small JPEG, or None.

    Ids come from the server's index: only a plain file name is looked up, never a path.
    """
    if not image_id or Path(image_id).name != image_id or image_id.startswith("."):
        return None
    for extension in EXTENSIONS:
        path = folder / f"{image_id}{extension}"
        if path.is_file():
            break
    else:
        return None
    try:
        with Image.open(path) as image:
            square = ImageOps.fit(ImageOps.exif_transpose(image).convert("RGB"),
                                  (THUMBNAIL_PX, THUMBNAIL_PX))  # fmt: skip
    except OSError:
        return None
    buffer = io.BytesIO()
    square.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
