"""Image-quality checks (dermanet.trust.quality) on generated pictures; real derm images are
checked in test_trust_sample.py."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from dermanet.data.synthetic import draw_lesion
from dermanet.trust import CHECKS, QualityThresholds, assess_quality


def lesion(size: int = 256, label: str = "NV", seed: int = 0) -> np.ndarray:
    return draw_lesion(label, size, np.random.default_rng(seed))[0]


def screenshot_like(width: int = 800, height: int = 600) -> np.ndarray:
    """A web page: white background, a header bar, text lines, buttons, a small chart."""
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, width, 48), fill=(255, 75, 75))
    rng = np.random.default_rng(1)
    for row in range(12):
        draw.text((20, 70 + 30 * row), "lorem ipsum " * int(rng.integers(2, 8)), fill=(40, 40, 40))
    for col in range(4):
        draw.rectangle((500 + 60 * col, 400 - 40 * col, 540 + 60 * col, 560), fill=(33, 195, 84))
    return np.asarray(page)


def test_synthetic_lesions_pass() -> None:
    for label in ("AK", "MEL", "NV", "VASC"):
        report = assess_quality(lesion(label=label))
        assert report.ok, (label, report.reasons)
        assert report.reasons == [] and report.failed == []


def test_black_dermatoscope_frame_is_not_mistaken_for_a_flat_or_dark_image() -> None:
    """A lesion seen through a round field of view covering a third of a black frame."""
    image = cv2.resize(lesion(label="MEL"), (600, 450))
    yy, xx = np.mgrid[0:450, 0:600]
    field = (yy - 225) ** 2 + (xx - 300) ** 2 < 155**2
    framed = (image * field[..., None]).astype(np.uint8)
    assert 0.25 < field.mean() < 0.4
    report = assess_quality(framed)
    assert report.ok, (report.reasons, report.measures)


@pytest.mark.parametrize("size", [1, 24, 64])
def test_tiny_images_report_only_their_size(size: int) -> None:
    small = cv2.resize(lesion(), (size, size), interpolation=cv2.INTER_AREA)
    report = assess_quality(small)
    assert not report.ok
    assert report.failed == ["too_small"]
    assert f"{size}x{size} px" in report.reasons[0] and "96 px" in report.reasons[0]


def test_blank_and_black_images() -> None:
    grey = np.full((450, 600, 3), 128, np.uint8)
    report = assess_quality(grey)
    assert report.failed == ["blank"]  # blur and low contrast follow from it: not repeated
    assert "blank" in report.reasons[0]
    black = np.zeros((450, 600, 3), np.uint8)
    assert assess_quality(black).failed == ["blank", "dark"]


def test_blurred_image() -> None:
    blurred = cv2.GaussianBlur(lesion(), (0, 0), 12)
    report = assess_quality(blurred)
    assert "blurred" in report.failed
    assert any("too blurred: sharpness" in r and "at least 8" in r for r in report.reasons)


def test_screenshot_like_image_is_flagged_as_flat() -> None:
    report = assess_quality(screenshot_like())
    assert "flat" in report.failed
    assert any("looks like a screen, document or graphic" in r for r in report.reasons)


def test_screenshot_flagged_after_jpeg_compression() -> None:
    ok, encoded = cv2.imencode(".jpg", screenshot_like()[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1].copy()
    assert "flat" in assess_quality(decoded).failed


def test_other_checks() -> None:
    base = lesion()
    assert assess_quality(cv2.resize(base, (1000, 300))).failed == ["aspect_ratio"]
    assert "dark" in assess_quality((base * 0.08).astype(np.uint8)).failed
    over = np.clip(base.astype(np.float32) * 5, 0, 255).astype(np.uint8)
    assert "over_exposed" in assess_quality(over).failed
    noise = np.random.default_rng(0).normal(0, 80, base.shape)
    noisy = np.clip(base + noise, 0, 255).astype(np.uint8)
    assert assess_quality(noisy).failed == ["noisy"]
    # Faint pixel noise over grey (a camera with its cap on): the 128 px analysis copy averages
    # it to a low spread, but its finest detail still carries as much energy as the whole.
    faint = np.random.default_rng(1).integers(0, 256, (600, 800, 3)).astype(np.uint8)
    report = assess_quality(faint)
    assert report.failed == ["noisy"], report
    assert "x the grey variance" in report.reasons[0]
    mel = lesion(label="MEL").astype(np.float32)
    low = (128 + (mel - 128) * 0.1).astype(np.uint8)
    assert "low_contrast" in assess_quality(low).failed


def test_greyscale_pictures_are_refused_and_faint_colour_passes() -> None:
    """Dermoscopy is in colour (derm-sample's least colourful image: chroma 6); scans, X-ray
    or MRI slices and black-and-white photos are not, however skin-like their texture."""
    grey = cv2.cvtColor(cv2.cvtColor(lesion(), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    report = assess_quality(grey)
    assert report.failed == ["greyscale"], report
    assert "no colour" in report.reasons[0] and "at least 3" in report.reasons[0]
    faint = grey.astype(np.int16)
    faint[..., 0] += 8  # a faint warm cast: chroma 8, as pale as real dermoscopy gets
    assert assess_quality(np.clip(faint, 0, 255).astype(np.uint8)).ok


def test_every_check_has_a_reason_with_value_and_limit() -> None:
    report = assess_quality(np.zeros((20, 200, 3), np.uint8))
    assert report.failed == ["too_small", "aspect_ratio"]
    assert "200x20 px" in report.reasons[0]
    assert "10.00:1" in report.reasons[1] and "2.5:1" in report.reasons[1]
    assert set(report.failed) <= set(CHECKS)


def test_thresholds_from_mapping() -> None:
    strict = QualityThresholds.from_mapping({"min_short_side": "300", "min_sharpness": 1})
    assert strict.min_short_side == 300 and isinstance(strict.min_short_side, int)
    assert assess_quality(lesion(256), strict).failed == ["too_small"]
    assert QualityThresholds.from_mapping(None) == QualityThresholds()
    assert QualityThresholds.from_mapping(strict.to_dict()) == strict
    with pytest.raises(ValueError, match="unknown quality thresholds"):
        QualityThresholds.from_mapping({"min_size": 10})
    with pytest.raises(ValueError, match="must be numbers"):
        QualityThresholds.from_mapping({"min_contrast": "high"})
    with pytest.raises(ValueError, match=">= 0"):
        QualityThresholds(min_brightness=-1)


def test_rejects_non_rgb_arrays() -> None:
    for bad in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32), [1, 2]):
        with pytest.raises(ValueError, match="RGB uint8"):
            assess_quality(bad)


def test_costs_a_few_milliseconds() -> None:
    image = cv2.resize(lesion(), (600, 450))
    times = []
    for _ in range(15):
        start = time.perf_counter()
        assess_quality(image)
        times.append(time.perf_counter() - start)
    assert np.median(times) < 0.025, f"median {np.median(times) * 1000:.1f} ms"


def test_histogram_measures_equal_the_sorting_ones() -> None:
    """The percentiles and the commonest-colour share, read off histograms for speed, are
    numpy's numbers (linear-interpolated percentiles; unique colours counted by sorting)."""
    from dermanet.trust.quality import commonest_colour_share, grey_percentiles

    rng = np.random.default_rng(5)
    images = [lesion(128, label, seed) for seed, label in enumerate(("MEL", "NV", "BCC"))]
    images += [screenshot_like()[:128, :128], rng.integers(0, 256, (97, 131, 3), np.uint8),
               np.zeros((3, 2, 3), np.uint8), np.full((1, 1, 3), 250, np.uint8)]  # fmt: skip
    percents = (0, 1, 37.5, 90, 99, 100)
    for image in images:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        np.testing.assert_allclose(
            grey_percentiles(grey, percents), np.percentile(grey.astype(np.float64), percents)
        )
        for levels in (2, 7, 64, 256):
            codes = (image.astype(np.int64) * levels // 256) @ [levels * levels, levels, 1]
            expected = np.unique(codes, return_counts=True)[1].max() / codes.size
            assert commonest_colour_share(image, levels) == pytest.approx(expected, abs=1e-12)
