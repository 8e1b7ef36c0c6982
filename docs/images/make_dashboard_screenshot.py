#!/usr/bin/env python
"""Refresh docs/images/dashboard.png, the README's picture of the dashboard, from `make demo`.

Why a script and not the browser test: the test serves a SYNTHETIC planted model (so that it
runs on any machine), while the README should show what a user gets: the shipped weights/,
its trust gate, prediction sets, Grad-CAM and similar-cases index. This starts the real demo
(`python -m dermanet.demo`, private Ray + Serve + Streamlit on free ports), uploads real
derm-sample images plus the current screenshot (the gate should refuse it: a grey light),
views the first image with Grad-CAM on and saves a full-page screenshot, shrunk to < 300 KB.

    .venv/bin/python docs/images/make_dashboard_screenshot.py            # derm-sample images
    .venv/bin/python docs/images/make_dashboard_screenshot.py --images a.jpg b.jpg

Needs Debian's chromium (`make browser`) and playwright (the `dev` extra). The tests' picture
of a non-dermoscopic upload is this file, so rerun tests/test_trust_serving.py and
tests/test_serve.py after refreshing it.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from dermanet.demo import Child, DemoError, wait_http
from dermanet.paths import PROJECT_ROOT, sample_dir
from dermanet.serving.runner import free_port
from dermanet.storage import atomic_write

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = PROJECT_ROOT / "docs" / "images" / "dashboard.png"
# the first three ISIC-archive images of derm-sample's test split (assign_splits(seed=0)): the
# model never trained or was chosen on them, and a train image would list itself as its
# nearest similar case
DEFAULT_IMAGES = ("ISIC_0000005.jpg", "ISIC_0000019.jpg", "ISIC_0000036.jpg")  # NV, NV, MEL
MISTAKE = "dashboard screenshot.png"
TIMEOUT_MS = 180_000


def save_small(png: bytes, target: Path, limit: int = 300_000) -> int:
    """Write the screenshot as a palette PNG, shrunk until it is under `limit` bytes."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    scale = 1.0
    while True:
        size = (round(image.width * scale), round(image.height * scale))
        small = image.resize(size, Image.Resampling.LANCZOS) if scale < 1 else image
        small = small.quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
        buffer = io.BytesIO()
        small.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= limit or scale < 0.3:
            break
        scale *= 0.85
    atomic_write(target, buffer.getvalue())
    return buffer.tell()


def drive(dashboard_url: str, uploads: list[Path]) -> bytes:
    """Upload, view the first image with Grad-CAM on, return a full-page PNG."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(dashboard_url, wait_until="domcontentloaded")
        page.get_by_text("Lesion dashboard").wait_for()
        page.locator("input[type=file]").set_input_files([str(p) for p in uploads])
        page.wait_for_function(
            f"document.querySelectorAll('.dn-card-name').length >= {len(uploads)}"
        )
        card = page.locator("[class*='st-key-card-']").filter(has_text=uploads[0].name)
        card.get_by_role("button", name="View").click()
        page.locator("h3").filter(has_text=uploads[0].name).wait_for()
        page.wait_for_function(
            "['green', 'yellow', 'red'].includes("
            "document.querySelector('.dn-light-big')?.getAttribute('data-light'))"
        )
        page.get_by_role("heading", name="Similar confirmed cases").wait_for()
        page.locator("[data-testid='stSidebar']").get_by_text("Grad-CAM").click()
        page.get_by_text("Grad-CAM ·").first.wait_for()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(2000)  # let the overlay and thumbnails paint
        main = page.locator("[data-testid='stMain']")
        height = int(main.evaluate("element => element.scrollHeight"))
        page.set_viewport_size({"width": 1440, "height": max(900, min(height + 20, 2000))})
        main.evaluate("element => element.scrollTo(0, 0)")
        page.wait_for_timeout(500)
        png = page.screenshot(full_page=True)
        browser.close()
        return png


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images",
        type=Path,
        nargs="+",
        help="lesion images to upload, the first one viewed (default: three derm-sample images "
        "from $DERMANET_SAMPLE_DIR)",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=PROJECT_ROOT / "weights", help="registry (weights/)"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="PNG to write (the README's)")
    parser.add_argument("--limit-kb", type=int, default=300, help="size limit of the PNG (300)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    images = args.images or [sample_dir() / "images" / name for name in DEFAULT_IMAGES]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        print(f"images not found: {missing} (set DERMANET_SAMPLE_DIR or pass --images)")
        return 2
    if not CHROMIUM.is_file():
        print(f"{CHROMIUM} not found: run `make browser` first")
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="dermanet-shot-"))
    mistake = scratch / MISTAKE  # the current picture, uploaded "by mistake"
    mistake.write_bytes(OUTPUT.read_bytes())
    serve_port, ui_port = free_port(), free_port()
    command = [sys.executable, "-m", "dermanet.demo", "--model-dir", str(args.model_dir),
               "--serve-port", str(serve_port), "--ui-port", str(ui_port),
               "--upload-dir", str(scratch / "uploads")]  # fmt: skip
    demo = Child("make demo", command, scratch / "demo.log", dict(os.environ))
    try:
        wait_http(f"http://127.0.0.1:{serve_port}/healthz", demo, 600, "the demo's Serve")
        wait_http(f"http://127.0.0.1:{ui_port}/_stcore/health", demo, 300, "the dashboard")
        png = drive(f"http://127.0.0.1:{ui_port}", [*images, mistake])
        size = save_small(png, args.output, args.limit_kb * 1000)
        print(f"wrote {args.output} ({size / 1000:.0f} KB); demo log: {demo.log}")
        return 0
    except DemoError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        demo.stop(signal.SIGINT, grace_s=120)  # the demo stops exactly what it started


if __name__ == "__main__":
    raise SystemExit(main())
