#!/usr/bin/env python
"""Refresh docs/images/dashboard.png, the README's picture of the dashboard, from `make demo`.

Why a script and not the browser test: the test serves a SYNTHETIC planted model (so that it
runs on any machine), while the README should show what a clinic user gets from the shipped
weights/. This starts the real demo (`python -m dermanet.demo`, private database, Ray, Serve
and Streamlit on free ports), adds an account with `python -m dermanet.accounts add`, picks a
derm-sample TEST-split lesion with 2-3 images that the shipped model classifies right, stores
it as a case (one visit per image, then its confirmed diagnosis), signs in in Chromium, opens
the case and saves a full-page screenshot, shrunk to < 300 KB.

    .venv/bin/python docs/images/make_dashboard_screenshot.py

Needs derm-sample, Debian's chromium (`make browser`) and playwright (the `dev` extra). The
tests' picture of a non-dermoscopic upload is this file, so rerun tests/test_trust_serving.py
and tests/test_serve.py after refreshing it.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pandas as pd
from PIL import Image

from dermanet.data.splits import assign_splits
from dermanet.demo import Child, DemoError, wait_http
from dermanet.paths import PROJECT_ROOT, sample_dir
from dermanet.serving.runner import free_port
from dermanet.storage import atomic_write

CHROMIUM = Path("/usr/bin/chromium")
OUTPUT = PROJECT_ROOT / "docs" / "images" / "dashboard.png"
ACCOUNT = "a.weber"  # not `demo`: the demo gives that account a fresh key (revoking others)
PATIENT, LESION, SITE = "P-0042", "L1", "back"  # a pseudonym, as the dashboard asks
VISITS = ("2026-01-12", "2026-04-20", "2026-07-27")  # one visit per image of the lesion
PREFERRED = ("MEL", "BCC", "BKL", "NV")  # a malignant lesion says more about the light
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


def sign_in_and_open(dashboard_url: str, key: str, case_id: str, title: str) -> bytes:
    """Sign in, find the case by its patient, open it, return a full-page PNG."""
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
        page.get_by_label("Account name").fill(ACCOUNT)
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text(f"Signed in as {ACCOUNT}").wait_for()
        page.get_by_label("Search by patient pseudonym").fill(PATIENT)
        page.get_by_label("Search by patient pseudonym").press("Enter")
        page.locator(f".st-key-case-{case_id}").get_by_role("button", name="Open").click()
        page.get_by_role("heading", name=title).wait_for()
        page.locator("[class*='st-key-visit-'] [data-testid='stImage'] img").first.wait_for()
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(2500)  # let the pictures and the chart paint
        main = page.locator("[data-testid='stMain']")
        height = int(main.evaluate("element => element.scrollHeight"))
        page.set_viewport_size({"width": 1440, "height": max(900, min(height + 20, 2000))})
        main.evaluate("element => element.scrollTo(0, 0)")
        page.wait_for_timeout(800)
        png = page.screenshot(full_page=True)
        browser.close()
        return png


@dataclass(frozen=True)
class Lesion:
    label: str
    images: list[Path]
    answers: list[dict]


def candidate_lesions(folder: Path, per_class: int) -> list[tuple[str, list[Path]]]:
    """TEST-split lesions (never trained or chosen on) with 2-3 images, preferred classes
    first, a few per class."""
    catalogue = pd.read_csv(folder / "metadata.csv")
    test = assign_splits(catalogue, seed=0).query("split == 'test'")
    sizes = test.groupby("lesion_id")["image"].transform("size")
    test = test[(sizes >= 2) & (sizes <= len(VISITS))]
    found = []
    for label in PREFERRED:
        lesions = test[test["label"] == label].groupby("lesion_id", sort=True)
        for _, rows in list(lesions)[:per_class]:
            found.append((label, [folder / "images" / f"{i}.jpg" for i in sorted(rows.image)]))
    return found


def lesion_model_gets_right(api: httpx.Client, folder: Path, per_class: int = 12) -> Lesion:
    """The first candidate lesion whose every image the shipped model accepts and puts in
    the lesion's class (asked through the API, as the dashboard would)."""
    for label, paths in candidate_lesions(folder, per_class):
        files = [("file", (path.name, path.read_bytes())) for path in paths]
        answer = api.post("/v1/classify", files=files)
        answer.raise_for_status()
        results = answer.json().get("results") or [answer.json()]
        if all(r["top_class"] == label and (r.get("gate") or {}).get("accepted", True)
               for r in results):  # fmt: skip
            return Lesion(label, paths, results)
    raise DemoError("no TEST-split lesion among the candidates is classified right")


def make_case(api: httpx.Client, lesion: Lesion) -> str:
    """The lesion as a case: one visit per image, then the confirmed diagnosis."""
    created = api.post("/v1/cases", json={"patient": PATIENT, "lesion": LESION, "site": SITE})
    created.raise_for_status()
    case_id = created.json()["case_id"]
    for path, taken in zip(lesion.images, VISITS, strict=False):
        files = {"file": (path.name, path.read_bytes())}
        api.post(
            f"/v1/cases/{case_id}/images", files=files, data={"taken_at": taken}
        ).raise_for_status()
    note = "Ground truth of the public HAM10000 / ISIC data set."
    body = {"label": lesion.label, "method": "histopathology", "note": note}
    api.post(f"/v1/cases/{case_id}/diagnosis", json=body).raise_for_status()
    return case_id


def new_account(env: dict[str, str]) -> str:
    """Upgrade the private database and add the account; its key (printed once, last line)."""
    for command in (["dermanet.db", "upgrade"], ["dermanet.accounts", "add", ACCOUNT, "--role",
                                                  "clinician"]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", *command], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise DemoError(f"python -m {' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout.strip().splitlines()[-1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, default=PROJECT_ROOT / "weights", help="registry (weights/)"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT, help="PNG to write (the README's)")
    parser.add_argument("--limit-kb", type=int, default=300, help="size limit of the PNG (300)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder = sample_dir()
    if not (folder / "metadata.csv").is_file():
        print(f"derm-sample not found at {folder} (set DERMANET_SAMPLE_DIR)")
        return 2
    if not CHROMIUM.is_file():
        print(f"{CHROMIUM} not found: run `make browser` first")
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="dermanet-shot-"))
    env = {**os.environ, "DERMANET_DATA_DIR": str(scratch / "data")}
    env.pop("DERMANET_DATABASE_URL", None)  # a private SQLite file, never a real database
    serve_port, ui_port = free_port(), free_port()
    command = [sys.executable, "-m", "dermanet.demo", "--model-dir", str(args.model_dir),
               "--serve-port", str(serve_port), "--ui-port", str(ui_port),
               "--upload-dir", str(scratch / "uploads")]  # fmt: skip
    demo = None
    try:
        key = new_account(env)
        demo = Child("make demo", command, scratch / "demo.log", env)
        serve_url = f"http://127.0.0.1:{serve_port}"
        wait_http(f"{serve_url}/healthz", demo, 600, "the demo's Serve")
        wait_http(f"http://127.0.0.1:{ui_port}/_stcore/health", demo, 300, "the dashboard")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=serve_url, headers=headers, timeout=300) as api:
            lesion = lesion_model_gets_right(api, folder)
            case_id = make_case(api, lesion)
        names = ", ".join(path.stem for path in lesion.images)
        print(f"case {case_id}: {lesion.label} lesion, images {names}, all classified right")
        title = f"Patient {PATIENT} · lesion {LESION} ({SITE})"
        png = sign_in_and_open(f"http://127.0.0.1:{ui_port}", key, case_id, title)
        size = save_small(png, args.output, args.limit_kb * 1000)
        print(f"wrote {args.output} ({size / 1000:.0f} KB); demo log: {demo.log}")
        return 0
    except (DemoError, httpx.HTTPError) as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if demo is not None:
            demo.stop(signal.SIGINT, grace_s=120)  # the demo stops exactly what it started


if __name__ == "__main__":
    raise SystemExit(main())
