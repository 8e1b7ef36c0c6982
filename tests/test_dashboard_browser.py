"""The running dashboard in headless Chromium (Playwright driving Debian's /usr/bin/chromium).

Signs in with an account's key and opens a case whose visit was uploaded through the API (its
stored answer's light is on the page). Then, on the single-image page, uploads real images
(derm-sample when present, else SYNTHETIC) and, by mistake, a screenshot of the dashboard: its
card gets a grey light and viewing it shows why it was refused instead of a risk level. Then
clicks a lesion's card, turns Grad-CAM on and saves a screenshot to test-artifacts/
dashboard.png, which the test then checks: the traffic light's colour is on it, and the viewer
shows a Grad-CAM image that differs from the plain image. Skips with the
reason when Chromium or Playwright is missing.
The README's docs/images/dashboard.png is made from the shipped model instead, by
docs/images/make_dashboard_screenshot.py.
"""

from __future__ import annotations

import io
import re
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

pytest_plugins = ["conftest_serve", "conftest_ui"]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]  # setup: registry, index, Serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
LIGHT_RGB = {"green": (0x1E, 0x9E, 0x5A), "yellow": (0xE0, 0xA8, 0x00), "red": (0xD6, 0x3A, 0x3A)}
GREY_RGB = (0x9C, 0xA3, 0xAF)  # the light of an image the gate refused
SHOT = "dashboard screenshot.png"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium (`apt-get install -y chromium`, "
            "or `make browser`) to run the browser test"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="playwright is not installed: `.venv/bin/pip install playwright`",
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


def colour_pixels(png: bytes, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).sum())


def sign_in(page, dashboard_url: str, name: str, key: str) -> None:
    """The sign-in form, as a user fills it."""
    page.goto(dashboard_url, wait_until="domcontentloaded")
    page.get_by_label("Account name").fill(name)
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {name}").wait_for()


def test_dashboard_in_chromium(
    browser,
    similar_index,
    dashboard_url: str,
    dashboard_keys: dict[str, str],
    serve_url: str,
    screenshot_images: list[Path],
    not_dermoscopy: dict[str, bytes],
    tmp_path: Path,
) -> None:
    from dermanet.classes import CLASS_NAMES
    from dermanet.paths import PROJECT_ROOT

    artifacts = PROJECT_ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = tmp_path / SHOT
    shot.write_bytes(not_dermoscopy["screenshot"])
    page = browser.new_page(
        viewport={"width": 1440, "height": 1000}, device_scale_factor=1, accept_downloads=True
    )
    page.set_default_timeout(TIMEOUT_MS)

    # a case with one visit, made through the API; signed in, the user finds and opens it
    headers = {"Authorization": f"Bearer {dashboard_keys['ui-alice']}"}
    with httpx.Client(base_url=serve_url, headers=headers, timeout=120) as api:
        patient = f"B-{uuid.uuid4().hex[:6]}"
        case = api.post("/v1/cases", json={"patient": patient, "lesion": "L2", "site": None})
        case_id = case.json()["case_id"]
        files = {"file": (screenshot_images[0].name, screenshot_images[0].read_bytes())}
        visit = api.post(
            f"/v1/cases/{case_id}/images", files=files, data={"taken_at": "2026-05-04"}
        )
        assert visit.status_code == 201, visit.text
    sign_in(page, dashboard_url, "ui-alice", dashboard_keys["ui-alice"])
    assert dashboard_keys["ui-alice"] not in page.url
    page.get_by_label("Search by patient pseudonym").fill(patient)
    page.get_by_label("Search by patient pseudonym").press("Enter")
    row = page.locator(f".st-key-case-{case_id}")
    row.get_by_role("button", name="Open").click()
    page.get_by_role("heading", name=f"Patient {patient} · lesion L2").wait_for()
    visit_card = page.locator(f".st-key-visit-{visit.json()['image_id']}")
    visit_card.locator(".dn-light").first.wait_for()
    assert (
        visit_card.locator(".dn-light").first.get_attribute("data-light")
        == (visit.json()["traffic_light"])
    )
    picture = visit_card.locator("[data-testid='stImage'] img")
    picture.wait_for()  # the stored image, fetched with the key
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=picture.element_handle()
    )

    page.locator("[data-testid='stSidebar']").get_by_text("Single image").click()
    page.get_by_role("heading", name="Single image").wait_for()
    page.get_by_text("Research software, not a medical device").first.wait_for()

    # upload several real images and a screenshot at once; the gallery shows traffic lights
    uploads = [*screenshot_images, shot]
    uploader = page.get_by_role("region", name="Add dermoscopic images")  # not the case page's,
    uploader.get_by_test_id("stFileUploaderDropzoneInput").set_input_files(  # while it fades
        [str(p) for p in uploads]
    )
    cards = page.locator(".dn-card-name")
    page.wait_for_function(
        f"document.querySelectorAll('.dn-card-name').length >= {len(uploads)}",
        timeout=TIMEOUT_MS,
    )
    assert cards.count() == len(uploads)
    assert {cards.nth(i).inner_text() for i in range(cards.count())} == {p.name for p in uploads}

    # the screenshot: a grey light on its card; viewed, the reason instead of a risk level
    shot_card = page.locator("[class*='st-key-card-']").filter(has_text=SHOT)
    assert shot_card.locator(".dn-light").get_attribute("data-light") == "unknown"
    shot_card.get_by_role("button", name=re.compile("^View")).click()
    page.locator("h3").filter(has_text=SHOT).wait_for()
    refusal = page.locator(".dn-refusal")
    refusal.wait_for()
    assert "This does not look like a dermoscopic image" in refusal.inner_text()
    assert page.locator(".dn-light-big").get_attribute("data-light") == "unknown"
    assert page.locator(".dn-risk-marker").count() == 0
    assert colour_pixels(page.locator(".dn-light-big").screenshot(), GREY_RGB) > 20
    assert colour_pixels(shot_card.locator(".dn-light").screenshot(), GREY_RGB) > 10
    page.locator("[data-similar-caveat]").wait_for()  # its nearest cases "mean little"

    # click the card of the first image (the last one uploaded is selected after upload)
    wanted = screenshot_images[0].name
    card = page.locator("[class*='st-key-card-']").filter(has_text=wanted)
    card.get_by_role("button", name="View").click()
    page.locator("h3").filter(has_text=wanted).wait_for()
    light = page.locator(".dn-light-big")
    light.wait_for()
    # Streamlit re-renders progressively: the screenshot's grey light can outlive the new
    # heading for a moment, so wait (bounded) for this image's own, accepted, light.
    page.wait_for_function(
        "['green', 'yellow', 'red'].includes("
        "document.querySelector('.dn-light-big')?.getAttribute('data-light'))",
        timeout=TIMEOUT_MS,
    )
    colour = light.get_attribute("data-light")
    assert colour in LIGHT_RGB
    viewer = page.locator("[data-testid='stImage']").first
    plain = viewer.screenshot()

    # under the prediction: the nearest confirmed cases of `default`'s index (SYNTHETIC train
    # split), nearest first, each with its thumbnail painted, and their vote
    page.get_by_role("heading", name="Similar confirmed cases").wait_for()
    cases = page.locator(".dn-cases figure.dn-case")
    cases.first.wait_for()
    assert cases.count() == 8 and page.locator("[data-similar-caveat]").count() == 0
    distances = [float(cases.nth(i).get_attribute("data-distance")) for i in range(8)]
    assert distances == sorted(distances)
    assert {cases.nth(i).get_attribute("data-label") for i in range(8)} <= set(CLASS_NAMES)
    widths = cases.locator("img").evaluate_all("images => images.map(i => i.naturalWidth)")
    assert widths == [32] * 8  # the index's 32 px thumbnails, decoded by the browser
    assert page.get_by_text("Vote of the 8 nearest confirmed cases").count() == 1

    # Grad-CAM on (sidebar toggle): the overlay replaces the plain image
    page.locator("[data-testid='stSidebar']").get_by_text("Grad-CAM").click()
    page.get_by_text("Grad-CAM ·").first.wait_for()
    page.get_by_text("Overlay").first.wait_for()
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)  # let the image paint
    overlay = page.locator("[data-testid='stImage']").first.screenshot()
    assert overlay != plain

    main = page.locator("[data-testid='stMain']")
    height = main.evaluate("element => element.scrollHeight")
    page.set_viewport_size({"width": 1440, "height": max(900, min(int(height) + 20, 2000))})
    main.evaluate("element => element.scrollTo(0, 0)")
    page.wait_for_timeout(500)
    shot = artifacts / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot: {shot}")
    data = shot.read_bytes()
    assert colour_pixels(data, LIGHT_RGB[colour]) > 50  # the traffic light is on the picture
    # the overlay's jet colours (deep blue, red) tint the viewer, not the plain skin tones
    # (with the 128 px default: +0.19 on a real derm-sample image, whose own blue-grey areas
    # count too, and more on a synthetic lesion; an overlay that is not drawn gives ~0)
    assert _jet_fraction(overlay) > _jet_fraction(plain) + 0.1

    # the case report downloads (built on click, with the Grad-CAM on screen)
    reports = {}
    for label in ("HTML", "PDF"):
        button = page.locator("[data-testid='stDownloadButton']").filter(has_text=label)
        with page.expect_download(timeout=TIMEOUT_MS) as download:
            button.locator("button").click()
        reports[label] = Path(download.value.path()).read_bytes()
        assert download.value.suggested_filename.startswith("dermanet-report-")
    assert b"DermaNet case report" in reports["HTML"] and b"data:image/png" in reports["HTML"]
    assert wanted.encode() in reports["HTML"] and b"Research software" in reports["HTML"]
    assert reports["HTML"].count(b'<figure class="dn-case') == 8  # the cases, in the report
    assert reports["PDF"].startswith(b"%PDF")
    page.close()


def _jet_fraction(png: bytes) -> float:
    """Share of pixels tinted by Grad-CAM's JET colour map, which plain skin has few of:
    strongly saturated (its red-yellow end, where the model looked) or blue to violet (its
    low end blended over skin: most of the picture when the map is focused on a small spot)."""
    hsv = np.asarray(Image.open(io.BytesIO(png)).convert("HSV")).astype(np.float32)
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    saturated = (saturation > 170) & (value > 90)
    bluish = (hue >= 140) & (hue <= 200) & (saturation > 60)  # PIL hue 0-255: ~200-280 degrees
    return float((saturated | bluish).mean())
