"""Finding image files by id and decoding any image a user may hand us into RGB uint8."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DOWNSAMPLED_SUFFIX = "_downsampled"
# Decompression-bomb guard: ~50 MP is far above any dermoscopy image we expect.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message says why in words a person can act on."""


class ImageTooLargeError(ImageDecodeError):
    """An image over the pixel limit (servers answer 413 rather than 422)."""


def image_id_from_filename(name: str) -> str:
    """`ISIC_0000001_downsampled.JPG` -> `ISIC_0000001`."""
    stem = Path(name).stem
    return stem[: -len(DOWNSAMPLED_SUFFIX)] if stem.endswith(DOWNSAMPLED_SUFFIX) else stem


def index_image_folder(folder: str | Path) -> dict[str, Path]:
    """Map image id -> file for every .jpg/.jpeg/.png under `folder` (recursive).

    When the same id exists twice (e.g. a full-size and a `_downsampled` copy) the full-size,
    then the shortest path wins, so the choice is deterministic.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a directory")
    found: dict[str, Path] = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(root) / name
            image_id = image_id_from_filename(name)
            best = found.get(image_id)
            if best is None or _preference(path) < _preference(best):
                found[image_id] = path
    return found


def _preference(path: Path) -> tuple[int, int, str]:
    return (int(Path(path).stem.endswith(DOWNSAMPLED_SUFFIX)), len(str(path)), str(path))


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_short_side: int | None = None,
    min_long_side: int | None = None,
) -> np.ndarray:
    """Decode bytes into an RGB uint8 array (H, W, 3), whatever the source mode.

    Grayscale, RGBA (composited on white), palette, 16-bit and CMYK images are converted, EXIF
    rotation applied. Raises ImageDecodeError for empty, non-image, truncated or oversized data.

    With `min_short_side` / `min_long_side`, a JPEG is decoded straight at the smallest DCT
    scale (1/2, 1/4, 1/8) that keeps its short and long sides at least that long: libjpeg
    then does a fraction of the work, and a 12 MP photo meant for an 80 px model never
    exists at full size. Other formats, and JPEGs too small to shrink, decode at full size.
    The pixel limit applies to the file's own size.
    """
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"the image is {width}x{height} = {width * height:,} pixels, over the limit "
                    f"of {max_pixels:,}; resize it before uploading"
                )
            if image.format in ("JPEG", "MPO") and (min_short_side or min_long_side):
                scale = jpeg_scale((width, height), min_short_side or 1, min_long_side or 1)
                if scale > 1:
                    image.draft(image.mode, (width // scale, height // scale))
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(
            "the image declares more pixels than Pillow will safely decode (a possible "
            "decompression bomb); resize it before uploading"
        ) from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            "the data is not an image format we can read (use JPEG or PNG)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"the image is corrupt or truncated ({exc})") from None
    return to_rgb_array(image)


JPEG_SCALES = (8, 4, 2)  # the DCT scalings libjpeg decodes at directly


def jpeg_scale(size: tuple[int, int], min_short_side: int, min_long_side: int) -> int:
    """The largest JPEG reduction (8, 4, 2, else 1) whose result keeps both minimum sides.

    PIL's `draft` rounds the reduced size up and picks its factor as min(W // w, H // h),
    so asking it for (W // s, H // s) gives exactly factor s.
    """
    short, long = min(size), max(size)
    for scale in JPEG_SCALES:
        if short // scale >= min_short_side and long // scale >= min_long_side:
            return scale
    return 1


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode into RGB uint8."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        gray = ((array - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode an image file into RGB uint8; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image file {path}: {exc.strerror}") from None
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"{path}: {exc}") from None


def decode_image_fast(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode with OpenCV (about 2x faster than PIL for JPEG); fall back to `decode_image`.

    For the training hot path. OpenCV's IMREAD_COLOR already yields 3-channel 8-bit output for
    grayscale, 16-bit and CMYK files and applies EXIF rotation; anything it cannot read (or
    that is RGBA / palette, where compositing matters) goes through the careful PIL decoder.
    """
    import cv2

    buffer = np.frombuffer(data, dtype=np.uint8)
    if buffer.size and data[:4] != b"\x89PNG":  # PNG may carry alpha: use the careful path
        bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
        if bgr is not None and bgr.shape[0] * bgr.shape[1] <= max_pixels:
            return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return decode_image(data, max_pixels=max_pixels)


def shrink_image(image: np.ndarray, side: int, edge: Literal["short", "long"]) -> np.ndarray:
    """Shrink so the short (or long) edge is at most `side`; never enlarge (that only adds bytes).

    Shards use the short edge (training crops need it), rendered Grad-CAM PNGs the long one.
    """
    import cv2

    height, width = image.shape[:2]
    scale = side / (min(height, width) if edge == "short" else max(height, width))
    if scale >= 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """RGB uint8 -> JPEG bytes."""
    import cv2

    ok, buffer = cv2.imencode(
        ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise ImageDecodeError("OpenCV could not encode the image as JPEG")
    return buffer.tobytes()
