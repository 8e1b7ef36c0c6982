"""An evaluation set of pictures that are NOT dermoscopy, built offline on any fresh machine.

The gate (quality checks + OOD score) is judged on what users upload by mistake: screenshots
(the dashboard itself), plots, documents, ordinary photos, patterns and noise, and derm images
ruined by blur, noise, darkness or size. Nothing is downloaded: pages are rendered by a local
headless Chromium, plots by matplotlib, documents with PIL and the fonts matplotlib ships, and
photos come from the samples inside installed packages (scikit-learn, matplotlib). Degraded
derm images come from the TEST split only, so nothing used to fit the gate leaks into its
evaluation. Output: DIR/<kind>/*.png|jpg and DIR/manifest.csv (path, kind, detail).

Deterministic given the seed: each kind draws from its own seeded generator, so changing one
kind's count never changes another's images.
"""

from __future__ import annotations

import base64
import gzip
import html
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from dermanet.classes import CLASS_NAMES

log = logging.getLogger(__name__)

KINDS = ("screenshot", "plot", "document", "photo", "pattern", "noise", "degraded_derm")
DEFAULT_COUNTS: dict[str, int] = {
    "screenshot": 80,
    "plot": 70,
    "document": 60,
    "photo": 60,
    "pattern": 60,
    "noise": 40,
    "degraded_derm": 100,
}
CHROMIUM_ENV = "DERMANET_CHROMIUM"  # a headless Chromium other than the one on PATH
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> Path | None:
    """$DERMANET_CHROMIUM, else the first of CHROMIUM_NAMES on PATH; None when none is."""
    named = os.environ.get(CHROMIUM_ENV)
    if named:
        return Path(named)
    found = next((shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name)), None)
    return Path(found) if found else None


CHROMIUM = find_chromium()
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)
# (width, height): desktop, laptop, phone portrait, square, small web images.
SIZES = (
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (1366, 768),
    (1920, 1080),
    (600, 450),
    (450, 600),
    (390, 844),
    (720, 1280),
    (512, 512),
    (300, 300),
    (1000, 400),
)
WORDS = [
    "model",
    "risk",
    "image",
    "patient",
    "lesion",
    "report",
    "score",
    "batch",
    "server",
    "request",
    "latency",
    "cluster",
    "training",
    "epoch",
    "accuracy",
    "validation",
    "metric",
    "upload",
    "gallery",
    "class",
    "probability",
    "dashboard",
    "network",
    "layer",
    "feature",
    "export",
    "checkpoint",
    "queue",
    "worker",
    "memory",
    "budget",
    "invoice",
    "order",
    "customer",
    "product",
    "quarterly",
    "revenue",
    "meeting",
    "agenda",
    "project",
    "status",
    "release",
    "version",
    "update",
    "settings",
    "account",
    "profile",
    "security",
    "password",
    "notification",
    "message",
    "calendar",
    "schedule",
    "weather",
    "travel",
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "by",
    "from",
    "at",
    "as",
    "be",
    "this",
    "that",
    "are",
    "was",
    "it",
    "an",
    "or",
]


@dataclass
class OODSetReport:
    """What was built: the manifest and, per kind, why it is missing or short (if so)."""

    manifest: pd.DataFrame
    skipped: dict[str, str] = field(default_factory=dict)


def build_ood_set(
    output: str | Path,
    derm_sample: str | Path | None = None,
    seed: int = 0,
    counts: dict[str, int] | None = None,
    chromium: str | Path | None = CHROMIUM,
) -> OODSetReport:
    """Write the OOD evaluation set under `output` and return its manifest.

    `counts` overrides images per kind (0 skips a kind). Screenshots need `chromium` (skipped
    with a logged reason when absent); degraded derm images need `derm_sample` (a folder with
    metadata.csv and images/), taken from its test split (assign_splits, seed 0).
    """
    output = Path(output)
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    unknown = sorted(set(counts) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kinds {unknown}; choose from {list(KINDS)}")
    output.mkdir(parents=True, exist_ok=True)
    test_images = _derm_test_images(derm_sample) if derm_sample else []
    rows: list[dict[str, str]] = []
    skipped: dict[str, str] = {}
    makers: dict[str, Callable[..., list[tuple[str, str]]]] = {
        "screenshot": lambda rng, n, d: _screenshots(rng, n, d, chromium, test_images),
        "plot": _plots,
        "document": _documents,
        "photo": _photos,
        "pattern": _patterns,
        "noise": _noise,
        "degraded_derm": lambda rng, n, d: _degraded_derm(rng, n, d, test_images),
    }
    for k, kind in enumerate(KINDS):
        n = int(counts[kind])
        folder = output / kind
        if folder.exists():
            shutil.rmtree(folder)  # a rebuild never mixes two seeds' (or builds') images
        if n <= 0:
            continue
        reason = _missing_requirement(kind, chromium, derm_sample, test_images)
        if reason:
            log.warning("OOD set: skipping %s: %s", kind, reason)
            skipped[kind] = reason
            continue
        folder.mkdir(parents=True)
        rng = np.random.default_rng([seed, k])
        made = makers[kind](rng, n, folder)
        if len(made) < n:
            skipped[kind] = f"made {len(made)} of {n} (see log)"
        rows += [{"path": f"{kind}/{name}", "kind": kind, "detail": d} for name, d in made]
        log.info("OOD set: %d %s images", len(made), kind)
    manifest = pd.DataFrame(rows, columns=["path", "kind", "detail"])
    manifest.to_csv(output / "manifest.csv", index=False)
    return OODSetReport(manifest, skipped)


def _missing_requirement(
    kind: str, chromium: str | Path | None, derm_sample: str | Path | None, test_images: list
) -> str | None:
    if kind == "screenshot" and not (chromium and Path(chromium).is_file()):
        return (
            f"Chromium not found ({chromium or 'none of ' + str(CHROMIUM_NAMES) + ' on PATH'});"
            " install Debian's chromium (`apt-get install -y chromium`) or set "
            f"{CHROMIUM_ENV} to include page screenshots"
        )
    if kind == "degraded_derm" and not test_images:
        where = derm_sample or "(not given)"
        return f"derm-sample not available at {where}; pass --derm-sample DIR"
    return None


def _derm_test_images(derm_sample: str | Path) -> list[Path]:
    """Files of derm-sample's test split (assign_splits seed 0), sorted by image id."""
    from dermanet.data import read_plain_csv
    from dermanet.data.splits import assign_splits

    root = Path(derm_sample)
    if not (root / "metadata.csv").is_file() or not (root / "images").is_dir():
        return []
    catalogue = assign_splits(read_plain_csv(root / "metadata.csv", root / "images"), seed=0)
    test = catalogue.loc[catalogue["split"] == "test"].sort_values("image")
    return [Path(p) for p in test["path"]]


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return SIZES[int(rng.integers(len(SIZES)))]


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(len(WORDS), size=n))


def _colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def _save(image: np.ndarray | Image.Image, path: Path, quality: int = 90) -> None:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if path.suffix == ".jpg":
        pil.convert("RGB").save(path, quality=quality)
    else:
        pil.save(path, optimize=False)


# ---------------------------------------------------------------- screenshots (Chromium)


def _screenshots(
    rng: np.random.Generator,
    n: int,
    folder: Path,
    chromium: str | Path | None,
    test_images: list[Path],
) -> list[tuple[str, str]]:
    pages = (_page_dashboard, _page_table, _page_form, _page_article, _page_code)
    made: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="dn-ood-chromium-") as tmp:
        for i in range(n):
            page = pages[i % len(pages)]
            dark = bool(rng.random() < 0.3)
            thumb = None
            if page is _page_dashboard and test_images and rng.random() < 0.5:
                thumb = test_images[int(rng.integers(len(test_images)))]
            width, height = _size(rng)
            source = Path(tmp) / f"page_{i:03d}.html"
            source.write_text(page(rng, dark, thumb))
            name = f"screenshot_{i:03d}.png"
            if _chromium_screenshot(chromium, source, folder / name, width, height, Path(tmp)):
                detail = f"{page.__name__[6:]} {'dark' if dark else 'light'} {width}x{height}"
                made.append((name, detail + (" with derm thumbnail" if thumb else "")))
    return made


def _chromium_screenshot(
    chromium: str | Path | None, source: Path, target: Path, width: int, height: int, tmp: Path
) -> bool:
    command = [
        str(chromium),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp / 'profile'}",
        f"--screenshot={target}",
        f"--window-size={width},{height}",
        source.as_uri(),
    ]
    try:
        subprocess.run(command, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        log.warning("Chromium timed out on %s", source.name)
        return False
    if not target.is_file():
        log.warning("Chromium wrote no screenshot for %s", source.name)
        return False
    return True


def _page_style(rng: np.random.Generator, dark: bool) -> tuple[str, str, str]:
    background, text = ("#0e1117", "#fafafa") if dark else ("#ffffff", "#262730")
    accent = _hex(_colour(rng, 30, 220))
    font = ("sans-serif", "serif", "monospace")[int(rng.integers(3))]
    size = int(rng.integers(12, 20))
    css = (
        f"body{{background:{background};color:{text};font-family:{font};font-size:{size}px;"
        "margin:16px}"
        f"h1,h2{{color:{accent}}} .card{{border:1px solid #8884;border-radius:8px;padding:10px;"
        "margin:8px;display:inline-block;vertical-align:top}}"
        "table{border-collapse:collapse} td,th{border:1px solid #8886;padding:4px 8px}"
    )
    return css, accent, text


def _page(css: str, body: str) -> str:
    return f"<!doctype html><html><head><style>{css}</style></head><body>{body}</body></html>"


def _page_dashboard(rng: np.random.Generator, dark: bool, thumb: Path | None) -> str:
    css, accent, _ = _page_style(rng, dark)
    cards = []
    for _ in range(int(rng.integers(2, 7))):
        light = ("#21c354", "#ffbd45", "#ff4b4b", "#808495")[int(rng.integers(4))]
        cls = CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
        p = float(rng.uniform(0.3, 0.99))
        image = ""
        if thumb is not None:
            data = base64.b64encode(thumb.read_bytes()).decode()
            image = f'<img src="data:image/jpeg;base64,{data}" width="160"><br>'
        cards.append(
            f'<div class="card">{image}<span style="display:inline-block;width:18px;'
            f'height:18px;border-radius:9px;background:{light}"></span> <b>{cls}</b> '
            f"{p:.1%}<div style='background:#8883;width:200px;height:12px'><div "
            f"style='background:{accent};width:{int(200 * p)}px;height:12px'></div></div>"
            f"<small>{html.escape(_words(rng, 6))}</small></div>"
        )
    body = (
        f"<div style='background:{accent};height:40px;margin:-16px -16px 12px'></div>"
        f"<h1>{html.escape(_words(rng, 3).title())}</h1>" + "".join(cards)
    )
    return _page(css, body)


def _page_table(rng: np.random.Generator, dark: bool, _thumb: Path | None) -> str:
    css, _, _ = _page_style(rng, dark)
    cols = int(rng.integers(3, 8))
    header = "".join(f"<th>{WORDS[int(rng.integers(len(WORDS)))]}</th>" for _ in range(cols))
    rows = "".join(
        "<tr>" + "".join(f"<td>{rng.normal(100, 50):.2f}</td>" for _ in range(cols)) + "</tr>"
        for _ in range(int(rng.integers(8, 40)))
    )
    return _page(css, f"<h2>{_words(rng, 3)}</h2><table><tr>{header}</tr>{rows}</table>")


def _page_form(rng: np.random.Generator, dark: bool, _thumb: Path | None) -> str:
    css, accent, _ = _page_style(rng, dark)
    fields = "".join(
        f"<p><label>{_words(rng, 2)}</label><br><input value='{_words(rng, 2)}' "
        "style='width:300px;padding:6px'></p>"
        for _ in range(int(rng.integers(3, 9)))
    )
    button = f"<button style='background:{accent};color:white;padding:8px 20px'>Submit</button>"
    return _page(css, f"<h1>{_words(rng, 2).title()}</h1><form>{fields}{button}</form>")


def _page_article(rng: np.random.Generator, dark: bool, _thumb: Path | None) -> str:
    css, _, _ = _page_style(rng, dark)
    paragraphs = "".join(
        f"<h2>{_words(rng, 4).title()}</h2><p>{_words(rng, int(rng.integers(40, 120)))}</p>"
        for _ in range(int(rng.integers(2, 6)))
    )
    return _page(css, f"<h1>{_words(rng, 5).title()}</h1>{paragraphs}")


def _page_code(rng: np.random.Generator, dark: bool, _thumb: Path | None) -> str:
    css, _, _ = _page_style(rng, dark)
    lines = []
    for _ in range(int(rng.integers(15, 50))):
        indent = "    " * int(rng.integers(0, 3))
        lines.append(
            f"{indent}{WORDS[int(rng.integers(60))]} = {_words(rng, 3).replace(' ', '_')}()"
        )
    code = html.escape("\n".join(lines))
    return _page(css, f"<pre style='background:#8882;padding:12px'>{code}</pre>")


# ---------------------------------------------------------------- plots (matplotlib)


def _plots(rng: np.random.Generator, n: int, folder: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ("default", "ggplot", "dark_background", "seaborn-v0_8", "bmh", "fivethirtyeight")
    kinds = ("line", "scatter", "bar", "hist", "heatmap", "pie", "contour", "grid")
    made = []
    for i in range(n):
        kind, style = kinds[i % len(kinds)], styles[int(rng.integers(len(styles)))]
        width, height = _size(rng)
        with plt.style.context(style):
            fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
            _draw_plot(fig, kind, rng)
            name = f"plot_{i:03d}.png"
            fig.savefig(folder / name, dpi=100)
            plt.close(fig)
        made.append((name, f"{kind} ({style}) {width}x{height}"))
    return made


def _draw_plot(fig, kind: str, rng: np.random.Generator) -> None:
    x = np.linspace(0, 10, 200)
    if kind == "grid":
        for j in range(4):
            ax = fig.add_subplot(2, 2, j + 1)
            ax.plot(x, np.cumsum(rng.normal(size=200)))
            ax.set_title(_words(rng, 2))
        fig.tight_layout()
        return
    ax = fig.add_subplot(1, 1, 1)
    if kind == "line":
        for _ in range(int(rng.integers(1, 5))):
            ax.plot(x, np.cumsum(rng.normal(size=200)), label=_words(rng, 1))
        ax.legend()
    elif kind == "scatter":
        ax.scatter(rng.normal(size=300), rng.normal(size=300), c=rng.random(300), s=12)
    elif kind == "bar":
        ax.bar(list(CLASS_NAMES), rng.random(len(CLASS_NAMES)))
    elif kind == "hist":
        ax.hist(rng.normal(size=2000), bins=int(rng.integers(10, 60)))
    elif kind == "heatmap":
        image = ax.imshow(
            rng.random((8, 8)), cmap=("viridis", "magma", "Blues")[int(rng.integers(3))]
        )
        fig.colorbar(image)
    elif kind == "pie":
        ax.pie(rng.random(5) + 0.2, labels=_words(rng, 5).split())
    elif kind == "contour":
        gx, gy = np.meshgrid(x, x)
        ax.contourf(gx, gy, np.sin(gx * rng.uniform(0.3, 1.5)) * np.cos(gy), levels=12)
    ax.set_title(_words(rng, 4))
    ax.set_xlabel(_words(rng, 1))
    ax.set_ylabel(_words(rng, 1))


# ---------------------------------------------------------------- documents (PIL text pages)


def _font_files() -> list[Path]:
    import matplotlib

    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
    return [ttf / name for name in names if (ttf / name).is_file()]


def _documents(rng: np.random.Generator, n: int, folder: Path) -> list[tuple[str, str]]:
    fonts = _font_files()
    pages = ((850, 1100), (1240, 1754), (600, 800), (1100, 850), (827, 1169))
    made = []
    for i in range(n):
        width, height = pages[int(rng.integers(len(pages)))]
        paper = (255, 255, 255) if rng.random() < 0.6 else _colour(rng, 225, 256)
        page = Image.new("RGB", (width, height), paper)
        draw = ImageDraw.Draw(page)
        scale = width / 850
        font_path = fonts[int(rng.integers(len(fonts)))] if fonts else None
        body_size = int(rng.integers(11, 18) * scale)
        body = _font(font_path, body_size)
        title = _font(font_path, int(body_size * 1.8))
        margin, y = int(70 * scale), int(70 * scale)
        draw.text((margin, y), _words(rng, 4).title(), fill=(20, 20, 20), font=title)
        y += int(body_size * 3.5)
        columns = 2 if rng.random() < 0.3 else 1
        column_width = (width - 2 * margin) // columns
        chars = max(10, int(column_width / (body_size * 0.55)))
        for c in range(columns):
            yy = y
            x0 = margin + c * column_width
            while yy < height - margin:
                line = _words(rng, 20)[:chars]
                draw.text((x0, yy), line, fill=(30, 30, 30), font=body)
                yy += int(body_size * 1.5)
                if rng.random() < 0.08:
                    yy += body_size  # paragraph break
        draw.text((width // 2, height - margin // 2), str(i + 1), fill=(60, 60, 60), font=body)
        scanned = rng.random() < 0.4
        if scanned:  # a scan: slight rotation, grey cast, sensor noise
            page = page.rotate(float(rng.uniform(-2, 2)), fillcolor=(200, 200, 200), expand=False)
            array = np.asarray(page, dtype=np.float32) * rng.uniform(0.85, 0.97)
            array += rng.normal(0, 6, array.shape)
            page = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        name = f"document_{i:03d}.{'jpg' if scanned else 'png'}"
        _save(page, folder / name)
        made.append(
            (name, f"{'scanned ' if scanned else ''}{columns}-column page {width}x{height}")
        )
    return made


def _font(path: Path | None, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size) if path else ImageFont.load_default(size)


# ---------------------------------------------------------------- photos (shipped in packages)


def _photo_sources() -> list[tuple[str, np.ndarray]]:
    """Photographs installed with scikit-learn and matplotlib (no download), plus an MRI slice."""
    import matplotlib
    from sklearn.datasets import load_sample_images

    sources = []
    sample = load_sample_images()
    for name, image in zip(sample.filenames, sample.images, strict=True):
        sources.append((Path(name).stem, np.asarray(image, dtype=np.uint8)))
    data = Path(matplotlib.get_data_path()) / "sample_data"
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
        if (data / name).is_file():
            sources.append((Path(name).stem, np.asarray(Image.open(data / name).convert("RGB"))))
    mri = data / "s1045.ima.gz"
    if mri.is_file():  # 256x256 16-bit brain MRI slice: medical, but not dermoscopy
        raw = np.frombuffer(gzip.decompress(mri.read_bytes()), dtype="<u2").reshape(256, 256)
        grey = (raw / max(int(raw.max()), 1) * 255).astype(np.uint8)
        sources.append(("mri_slice", np.repeat(grey[..., None], 3, axis=2)))
    return sources


def _photos(rng: np.random.Generator, n: int, folder: Path) -> list[tuple[str, str]]:
    sources = _photo_sources()
    made = []
    for i in range(n):
        name_src, image = sources[i % len(sources)]
        h, w = image.shape[:2]
        if i < len(sources):
            crop, box = image, "whole"
        else:  # random crop: close-ups are the harder case (a face's skin, petals)
            scale = float(rng.uniform(0.25, 0.9))
            ch, cw = max(32, int(h * scale)), max(32, int(w * scale * rng.uniform(0.7, 1.4)))
            cw = min(cw, w)
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop, box = image[y0 : y0 + ch, x0 : x0 + cw], f"crop {cw}x{ch}+{x0}+{y0}"
        target_w, target_h = _size(rng)
        factor = min(target_w / crop.shape[1], target_h / crop.shape[0], 2.0)
        size = (max(1, round(crop.shape[1] * factor)), max(1, round(crop.shape[0] * factor)))
        out = cv2.resize(np.ascontiguousarray(crop), size, interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            out = out[:, ::-1]
        name = f"photo_{i:03d}.jpg"
        _save(np.ascontiguousarray(out), folder / name, quality=int(rng.integers(70, 95)))
        made.append((name, f"{name_src} {box} -> {size[0]}x{size[1]}"))
    return made


# ---------------------------------------------------------------- patterns and noise


def _patterns(rng: np.random.Generator, n: int, folder: Path) -> list[tuple[str, str]]:
    kinds = ("checkerboard", "stripes", "gradient", "radial", "flat", "circles", "rectangles",
             "colour_bars", "grid")  # fmt: skip
    made = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        width, height = _size(rng)
        image = _pattern(kind, width, height, rng)
        name = f"pattern_{i:03d}.png"
        _save(image, folder / name)
        made.append((name, f"{kind} {width}x{height}"))
    return made


def _pattern(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    if kind == "checkerboard":
        cell = int(rng.integers(4, 80))
        mask = ((yy // cell + xx // cell) % 2)[..., None]
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 80)
        mask = ((xx * np.cos(angle) + yy * np.sin(angle)) // (period / 2) % 2)[..., None]
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        mask = ((t - t.min()) / (np.ptp(t) or 1.0))[..., None]
    elif kind == "radial":
        r = np.hypot(xx - width * rng.random(), yy - height * rng.random())
        mask = (r / r.max())[..., None]
    elif kind == "flat":
        mask = np.zeros((height, width, 1), np.float32)
    elif kind == "circles":
        r = np.hypot(xx - width / 2, yy - height / 2)
        mask = (r // rng.uniform(5, 40) % 2)[..., None]
    elif kind == "colour_bars":
        bars = np.array([_colour(rng) for _ in range(8)], np.float32)
        return bars[np.minimum((xx * 8 // width).astype(int), 7)].astype(np.uint8)
    elif kind == "grid":
        step = int(rng.integers(10, 60))
        mask = (((yy % step) < 2) | ((xx % step) < 2)).astype(np.float32)[..., None]
    else:  # rectangles
        canvas = Image.new("RGB", (width, height), _colour(rng))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 15))):
            x0, y0 = int(rng.integers(width)), int(rng.integers(height))
            x1, y1 = x0 + int(rng.integers(10, width)), y0 + int(rng.integers(10, height))
            draw.rectangle((x0, y0, x1, y1), fill=_colour(rng))
        return np.asarray(canvas)
    return (a * (1 - mask) + b * mask).astype(np.uint8)


def _noise(rng: np.random.Generator, n: int, folder: Path) -> list[tuple[str, str]]:
    kinds = ("uniform", "gaussian", "salt_pepper", "smooth", "grey")
    made = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        width, height = _size(rng)
        shape = (height, width, 3)
        if kind == "uniform":
            image = rng.integers(0, 256, shape)
        elif kind == "gaussian":
            image = rng.normal(_colour(rng, 60, 200), rng.uniform(20, 70), shape)
        elif kind == "salt_pepper":
            image = np.where(rng.random(shape[:2])[..., None] < 0.5, 0, 255) * np.ones(3)
        elif kind == "smooth":  # cloud-like low-frequency noise, the least obviously artificial
            small = rng.normal(0, 1, (max(2, height // 32), max(2, width // 32), 3))
            blurred = cv2.resize(small.astype(np.float32), (width, height), cv2.INTER_CUBIC)
            image = 128 + blurred / (blurred.std() or 1.0) * 40
        else:
            image = np.repeat(rng.normal(128, 50, shape[:2])[..., None], 3, axis=2)
        name = f"noise_{i:03d}.png"
        _save(np.clip(image, 0, 255).astype(np.uint8), folder / name)
        made.append((name, f"{kind} {width}x{height}"))
    return made


# ---------------------------------------------------------------- degraded derm (test split)


def _degraded_derm(
    rng: np.random.Generator, n: int, folder: Path, test_images: list[Path]
) -> list[tuple[str, str]]:
    kinds = ("blur", "noise", "dark", "tiny", "overexposed")
    chosen = rng.choice(len(test_images), size=min(n, len(test_images)), replace=False)
    made = []
    for i, index in enumerate(chosen):
        kind = kinds[i % len(kinds)]
        path = test_images[int(index)]
        image = np.asarray(Image.open(path).convert("RGB"))
        out, detail = _degrade(image, kind, rng)
        name = f"degraded_{i:03d}.png"
        _save(out, folder / name)
        made.append((name, f"{kind} {detail} of {path.stem}"))
    return made


def _degrade(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """One heavy degradation: far beyond what a usable dermoscopy photo shows."""
    if kind == "blur":
        sigma = float(rng.uniform(0.04, 0.08) * min(image.shape[:2]))
        return cv2.GaussianBlur(image, (0, 0), sigma), f"gaussian sigma {sigma:.1f} px"
    if kind == "noise":
        sigma = float(rng.uniform(60, 100))
        noisy = image.astype(np.float32) + rng.normal(0, sigma, image.shape)
        return np.clip(noisy, 0, 255).astype(np.uint8), f"gaussian noise sigma {sigma:.0f}"
    if kind == "dark":
        factor = float(rng.uniform(0.03, 0.1))
        return (image * factor).astype(np.uint8), f"brightness x{factor:.2f}"
    if kind == "tiny":
        short = int(rng.integers(12, 40))
        scale = short / min(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA), f"{size[0]}x{size[1]} px"
    factor = float(rng.uniform(3, 6))  # overexposed
    return np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8), f"x{factor:.1f}"
