"""Image decoding: every mode users upload becomes RGB uint8; bad data gets a clear error."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from dermanet.data import ImageDecodeError, decode_image
from dermanet.data.images import ImageTooLargeError


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_modes_are_converted_to_rgb() -> None:
    rgb = Image.new("RGB", (8, 6), (200, 100, 50))
    cases = {
        "rgb": (_encode(rgb, "JPEG", quality=100), (200, 100, 50)),
        "gray": (_encode(Image.new("L", (8, 6), 128)), (128, 128, 128)),
        "rgba transparent on white": (
            _encode(Image.new("RGBA", (8, 6), (0, 0, 0, 0))),
            (255, 255, 255),
        ),
        "palette": (_encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE)), (200, 100, 50)),
        "cmyk": (
            _encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG", quality=100),
            (255, 0, 0),
        ),
    }
    sixteen = Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))
    cases["16-bit"] = (_encode(sixteen), (255, 255, 255))
    for name, (data, colour) in cases.items():
        out = decode_image(data)
        assert out.shape == (6, 8, 3) and out.dtype == np.uint8, name
        assert np.abs(out[3, 4].astype(int) - colour).max() <= 3, (name, out[3, 4])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty"),
        (b"hello, I am a text file named lesion.jpg", "not an image format"),
    ],
)
def test_bad_bytes(data: bytes, expected: str) -> None:
    with pytest.raises(ImageDecodeError, match=expected):
        decode_image(data)


def test_truncated_jpeg() -> None:
    noise = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    data = _encode(noise, "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_stops_decompression_bombs() -> None:
    big = _encode(Image.new("L", (3000, 3000)))  # ~9 MP, a few KB compressed
    with pytest.raises(ImageTooLargeError, match="over the limit of 1,000,000"):
        decode_image(big, max_pixels=1_000_000)
    assert issubclass(ImageTooLargeError, ImageDecodeError)  # callers catching the base still work


def test_pillow_bomb_guard_is_reported_as_too_large() -> None:
    huge = _encode(Image.new("1", (10_000, 9_000)))  # 90 MP: over Pillow's own bomb threshold
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):
        decode_image(huge, max_pixels=10**12)


def _photo(width: int, height: int) -> Image.Image:
    """A smooth, photo-like RGB picture (gradients + a dark blob), for decode comparisons."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = np.exp(
        -(((x - 0.4 * width) / (0.2 * width)) ** 2 + ((y - 0.6 * height) / (0.2 * height)) ** 2)
    )
    rgb = np.stack(
        [200 - 120 * blob, 140 + 40 * x / width - 100 * blob, 120 + 50 * y / height - 80 * blob],
        axis=2,
    )
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("size", "short", "long", "expected"),
    [
        ((1600, 1200), 128, None, (150, 200)),  # 1/8: both sides still >= 128
        ((1600, 1200), 200, None, (300, 400)),  # 1/4
        ((1600, 1200), 128, 768, (600, 800)),  # Grad-CAM display: long side >= 768 -> 1/2
        ((341, 256), 128, None, (128, 171)),  # 1/2 (PIL rounds the reduced size up)
        ((200, 150), 128, None, (150, 200)),  # too small to shrink: full size
    ],
)
def test_jpeg_decodes_straight_towards_the_size_asked(size, short, long, expected) -> None:
    data = _encode(_photo(*size), "JPEG", quality=92)
    out = decode_image(data, min_short_side=short, min_long_side=long)
    assert out.shape == (*expected, 3) and out.dtype == np.uint8
    # content: what an area resize of the full decode gives, up to JPEG's DCT scaling
    full = decode_image(data)
    reference = cv2.resize(full, (expected[1], expected[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - reference).mean() < 2.0


def test_reduced_decoding_keeps_rotation_formats_and_limits() -> None:
    rotated = _photo(1600, 1200)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    data = _encode(rotated, "JPEG", quality=90, exif=exif.tobytes())
    assert decode_image(data).shape == (1600, 1200, 3)  # portrait after rotation
    assert decode_image(data, min_short_side=128).shape == (200, 150, 3)
    png = _encode(_photo(800, 600))  # PNG has no reduced decoding: full size
    assert decode_image(png, min_short_side=64).shape == (600, 800, 3)
    big = _encode(Image.new("RGB", (3000, 3000)), "JPEG")  # the limit is the file's own size
    with pytest.raises(ImageTooLargeError, match="9,000,000 pixels"):
        decode_image(big, max_pixels=1_000_000, min_short_side=64)
