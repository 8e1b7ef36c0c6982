"""Image decoding: every mode users upload becomes RGB uint8; bad data gets a clear error."""

from __future__ import annotations

import io

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
