"""What the inference benchmarks share: test uploads, a repeat-and-take-the-median timer, the
plain ("before") preprocessing path as a baseline, the machine line for the docs, and a
refusal to measure a machine that is already busy."""

from __future__ import annotations

import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from dermanet.data.images import decode_image
from dermanet.data.synthetic import draw_lesion
from dermanet.data.transforms import eval_transform, to_model_input
from dermanet.inference import Predictor
from dermanet.paths import sample_available, sample_dir


def uploads(count: int, size: tuple[int, int] | None, seed: int = 0) -> tuple[list[bytes], str]:
    """`count` JPEG uploads: real derm-sample images (re-encoded at `size`, W x H, when given),
    else SYNTHETIC lesions; and a description for the table's caption."""
    if sample_available():
        root = sample_dir()
        meta = pd.read_csv(root / "metadata.csv").sample(n=count, random_state=seed)
        files = [(root / "images" / f"{image}.jpg").read_bytes() for image in meta["image"]]
        what = "real derm-sample JPEGs"
    else:
        rng = np.random.default_rng(seed)
        files = [_jpeg(draw_lesion("MEL", 256, rng)[0]) for _ in range(count)]
        what = "SYNTHETIC lesion JPEGs (derm-sample not found)"
    if size is None:
        return files, what + " at their own sizes"
    resized = [_jpeg(np.asarray(Image.open(io.BytesIO(f)).convert("RGB").resize(size)))
               for f in files]  # fmt: skip
    return resized, f"{what} re-encoded at {size[0]}x{size[1]} (quality 90)"


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per core above which a run is refused


def refuse_if_busy(allow_busy: bool = False) -> str:
    """Exit (status 1) when the 1-minute load average is already at least half the cores: the
    numbers would measure the other work (a training run, a test suite) as much as ours.
    Returns the load averages, for the table's caption."""
    load = os.getloadavg()
    line = ", ".join(f"{v:.1f}" for v in load)
    cores = os.cpu_count() or 1
    if load[0] >= BUSY_LOAD_PER_CORE * cores and not allow_busy:
        sys.exit(
            f"the machine is busy (load average {line} on {cores} cores): measure when it is "
            "quiet, or pass --allow-busy to measure anyway (and say so with the numbers)"
        )
    return line


def parse_size(text: str) -> tuple[int, int] | None:
    """'427x320' → (427, 320); 'native' → None."""
    if text == "native":
        return None
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def rate(run: Callable[[], int], seconds: float, repeats: int) -> tuple[float, list[float]]:
    """Median items/s over `repeats` timed windows of at least `seconds` each (after a warm-up
    call); `run()` processes some items and returns how many."""
    run()
    rates = []
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            done += run()
        rates.append(done / elapsed)
    return statistics.median(rates), rates


def latencies_ms(call: Callable[[], object], count: int, warmup: int = 3) -> list[float]:
    """Wall time of `count` sequential calls (after `warmup` untimed ones), in ms."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def before_tensor(predictor: Predictor, datas: list[bytes]) -> torch.Tensor:
    """The baseline preprocessing: full-size decode, albumentations'
    eval transform and normalisation per image, then stacking."""
    return before_tensor_from_images(predictor, [decode_image(d) for d in datas])


def before_tensor_from_images(predictor: Predictor, images: list[np.ndarray]) -> torch.Tensor:
    """The baseline's preprocessing alone, on already decoded images."""
    loaded = predictor.checkpoint
    transform = eval_transform(
        loaded.img_size, loaded.mean, loaded.std, color_constancy=loaded.color_constancy
    )
    return torch.from_numpy(np.stack([to_model_input(transform, im) for im in images]))


def machine_line(threads: int) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} CPU cores, {threads} thread(s), load average {load:.1f} at the end, "
        f"torch {torch.__version__}"
    )
