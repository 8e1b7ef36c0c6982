"""CPU inference backends and the in-process Predictor, measured in one run.

    .venv/bin/python -m benchmarks.inference_backends       # ~6 min on 2 quiet cores
    .venv/bin/python -m benchmarks.inference_backends --seconds 0.3 --repeats 1 --images 16 \
        --latency-calls 3 --no-compile                   # checks the script, no numbers

Four tables (medians of --repeats timed windows of --seconds each, same process, same
threads, same images):
1. the model call alone (float32 batch in, logits + features out): torch eager (the
   baseline), torch channels-last, torch.compile (inductor; the reason is printed when it
   cannot run here) and ONNX Runtime, at batch 1 and 16;
2. the whole in-process Predictor (JPEG bytes → answers with the gate and prediction set):
   the baseline path (full-size decode, albumentations per image, torch eager) against the
   served path on torch and on ONNX Runtime;
3. where one image's time goes in 2. (decode, preprocessing, model, trust: quality checks,
   OOD score and prediction set), ms per image at batch 16;
4. latency of one upload: classify (torch, ONNX Runtime) against Grad-CAM today and before
   (p50 and p90 of --latency-calls sequential calls on the same JPEG).
Tables 1-3 and the first rows of 4 use one view; a checkpoint served with test-time views
(`LoadedCheckpoint.tta`) adds rows for classify and Grad-CAM with its views.
Default model weights/default.pt; uploads are real derm-sample JPEGs re-encoded at 427x320
(--image-size native keeps their own sizes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import sys
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.bench_common import (
    before_tensor,
    before_tensor_from_images,
    latencies_ms,
    machine_line,
    parse_size,
    rate,
    uploads,
)
from dermanet.classes import CLASS_NAMES
from dermanet.data.images import decode_image, shrink_image
from dermanet.inference import GradCamExplainer, Predictor, load_checkpoint
from dermanet.inference.gradcam import render, upsample_cam
from dermanet.inference.onnx_backend import OnnxEngine
from dermanet.inference.predictor import TorchEngine
from dermanet.paths import PROJECT_ROOT

BATCHES = (1, 16)


def engines(
    predictor: Predictor, threads: int, compile_model: bool = True
) -> tuple[dict[str, object], dict[str, str]]:
    """name → engine (model call), and name → why a variant could not run."""
    model = predictor.checkpoint.model
    cpu = torch.device("cpu")
    found: dict[str, object] = {
        "torch eager": TorchEngine(model, cpu),
        "torch channels-last": TorchEngine(copy.deepcopy(model), cpu, channels_last=True),
    }
    failed: dict[str, str] = {}
    try:
        if not compile_model:
            raise RuntimeError("skipped (--no-compile)")
        compiled = torch.compile(copy.deepcopy(model))
        engine = TorchEngine(compiled, cpu)
        started = time.perf_counter()
        for batch in BATCHES:  # compile both shapes now, outside the timed windows
            engine(torch.zeros(batch, 3, predictor.img_size, predictor.img_size))
        print(f"torch.compile: compiled in {time.perf_counter() - started:.0f} s")
        found["torch.compile (inductor)"] = engine
    except Exception as exc:  # whatever inductor raises: report it, measure the rest
        failed["torch.compile (inductor)"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    found["ONNX Runtime"] = OnnxEngine.for_checkpoint(predictor.checkpoint, threads=threads)
    return found, failed


def model_table(predictor: Predictor, datas: list[bytes], args) -> list[str]:
    found, failed = engines(predictor, args.threads, args.compile)
    x_all = predictor.to_tensor([predictor.decode(d) for d in datas])
    lines = ["| model call | batch | images/s (median) | runs | vs torch eager |",
             "|---|---:|---:|---|---:|"]  # fmt: skip
    for batch in BATCHES:
        x = x_all[:batch].repeat(max(1, batch // len(x_all) + 1), 1, 1, 1)[:batch]
        baseline = None
        for name, engine in found.items():
            median, runs = rate(lambda e=engine, x=x, n=batch: (e(x), n)[1], args.seconds,
                                args.repeats)  # fmt: skip
            baseline = baseline or median
            shown = ", ".join(f"{r:.0f}" for r in runs)
            lines.append(f"| {name} | {batch} | {median:.0f} | {shown} | "
                         f"{median / baseline:.2f}x |")  # fmt: skip
            print(lines[-1], flush=True)
    lines += [f"| {name} | – | could not run: {why} | | |" for name, why in failed.items()]
    return lines


def predictor_table(checkpoint, datas: list[bytes], args) -> tuple[list[str], list[str]]:
    """Bytes → answers: before (baseline) vs today on torch and ONNX, one view; today with the
    checkpoint's served views if it has some; then per-stage times (one view)."""
    one_view = dataclasses.replace(checkpoint, tta="none")
    torch_p = Predictor(one_view)
    onnx_p = Predictor(one_view, backend="onnx")
    served = {}
    if checkpoint.tta != "none":
        served_p = Predictor(checkpoint, backend="onnx")
        served[f"today, ONNX Runtime, served views ({checkpoint.tta})"] = lambda: today(served_p)
    batch = 16

    def chunks():
        for start in range(0, len(datas) - batch + 1, batch):
            yield datas[start : start + batch]

    def before() -> int:
        for chunk in chunks():
            images = [decode_image(d) for d in chunk]
            x = before_tensor(torch_p, chunk)
            with torch.inference_mode():
                out = torch_p.model(x)
            torch_p.predictions([torch_p.assess(i) for i in images], out.logits.numpy(),
                               out.features.numpy())  # fmt: skip
        return len(datas) // batch * batch

    def today(predictor: Predictor) -> int:
        for chunk in chunks():
            predictor.predict_batch([predictor.decode(d) for d in chunk])
        return len(datas) // batch * batch

    lines = ["| in-process Predictor, batch 16 | images/s (median) | runs | vs before |",
             "|---|---:|---|---:|"]  # fmt: skip
    baseline = None
    for name, run in (
        ("before: full decode, albumentations per image, torch eager", before),
        ("today: reduced JPEG decode, one resize, batch normalising, torch",
         lambda: today(torch_p)),
        ("today, ONNX Runtime", lambda: today(onnx_p)),
        *served.items(),
    ):  # fmt: skip
        median, runs = rate(run, args.seconds, args.repeats)
        baseline = baseline or median
        lines.append(f"| {name} | {median:.0f} | {', '.join(f'{r:.0f}' for r in runs)} | "
                     f"{median / baseline:.2f}x |")  # fmt: skip
        print(lines[-1], flush=True)
    return lines, stage_table(torch_p, onnx_p, datas[:batch], args)


def stage_table(torch_p: Predictor, onnx_p: Predictor, chunk: list[bytes], args) -> list[str]:
    """Median ms per image of each stage at batch 16, before and today."""
    n = len(chunk)

    def per_image(fn) -> float:
        median, _ = rate(lambda: (fn(), n)[1], args.seconds / 2, args.repeats)
        return 1000.0 / median

    full = [decode_image(d) for d in chunk]
    small = [torch_p.decode(d) for d in chunk]
    x_before = before_tensor(torch_p, chunk)
    x_today = torch_p.to_tensor(small)
    logits, features = torch_p.forward(small)
    stages = {
        "decode": (lambda: [decode_image(d) for d in chunk],
                   lambda: [torch_p.decode(d) for d in chunk]),
        "preprocess (resize, normalise, stack)": (
            lambda: before_tensor_from_images(torch_p, full), lambda: torch_p.to_tensor(small)),
        "model, torch eager": (lambda: torch_p.engine(x_before), lambda: torch_p.engine(x_today)),
        "model, ONNX Runtime": (None, lambda: onnx_p.engine(x_today)),
        "trust: quality checks, OOD score, prediction set": (
            lambda: torch_p.predictions([torch_p.assess(i) for i in full], logits, features),
            lambda: torch_p.predictions([torch_p.assess(i) for i in small], logits, features)),
    }  # fmt: skip
    lines = ["| stage (batch 16) | before ms/image | today ms/image |", "|---|---:|---:|"]
    for name, (old, new) in stages.items():
        before_ms = f"{per_image(old):.2f}" if old else "–"
        lines.append(f"| {name} | {before_ms} | {per_image(new):.2f} |")
        print(lines[-1], flush=True)
    return lines


def gradcam_table(checkpoint, data: bytes, args) -> list[str]:
    """p50 / p90 latency of one upload (bytes → answer): classify on torch and on ONNX Runtime,
    Grad-CAM today on torch (one forward + short backward, rendered PNG) and on ONNX Runtime
    as Serve runs it (classify's call with the feature map, the gradient through the head
    alone in torch), and the baseline explanation, one view; then classify and Grad-CAM with the
    checkpoint's served views if it has some, on torch alone (all views in its one forward)
    and as Serve runs it. Ratios against torch's one-view classify and against classify as
    served (ONNX Runtime, the served views)."""
    one_view = dataclasses.replace(checkpoint, tta="none")
    torch_p = Predictor(one_view)
    onnx_p = Predictor(one_view, backend="onnx")
    explainer = GradCamExplainer(torch_p)
    onnx_cam = GradCamExplainer(onnx_p)
    served_classify = "classify, ONNX Runtime (Serve's default on CPU)"
    calls = {
        "classify, torch": lambda: torch_p.predict_bytes(data),
        served_classify: lambda: onnx_p.predict_bytes(data),
        "Grad-CAM before: predict + pytorch-grad-cam + PNG": lambda: gradcam_before(
            explainer, decode_image(data)),
        "Grad-CAM today, torch (overlay PNG, 768 px)": lambda: explainer.explain(
            explainer.decode(data)),
        "Grad-CAM today, ONNX Runtime (Serve's)": lambda: onnx_cam.explain(onnx_cam.decode(data)),
    }  # fmt: skip
    if checkpoint.tta != "none":
        views = checkpoint.tta
        served_onnx = Predictor(checkpoint, backend="onnx")
        torch_cam = GradCamExplainer(Predictor(checkpoint))
        served_cam = GradCamExplainer(served_onnx)
        served_classify = f"classify, ONNX Runtime, served views ({views})"
        calls[served_classify] = lambda: served_onnx.predict_bytes(data)
        calls[f"Grad-CAM, served views ({views}), torch alone"] = (
            lambda: torch_cam.explain(torch_cam.decode(data)))  # fmt: skip
        calls[f"Grad-CAM, served views ({views}), ONNX Runtime (Serve's)"] = (
            lambda: served_cam.explain(served_cam.decode(data)))  # fmt: skip
    results = {}
    for name, call in calls.items():
        results[name] = np.percentile(latencies_ms(call, args.latency_calls), [50, 90])
        print(f"{name}: p50 {results[name][0]:.1f} ms", flush=True)
    lines = ["| one upload (same JPEG) | p50 ms | p90 ms | p50 vs classify, torch | "
             "p50 vs classify as served |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    baseline, served = results["classify, torch"][0], results[served_classify][0]
    for name, (p50, p90) in results.items():
        lines.append(f"| {name} | {p50:.1f} | {p90:.1f} | {p50 / baseline:.2f}x | "
                     f"{p50 / served:.2f}x |")  # fmt: skip
    return lines


def gradcam_before(explainer: GradCamExplainer, image: np.ndarray) -> bytes:
    """The baseline explanation: a separate classify pass, then pytorch-grad-cam's
    GradCAM (its own forward and a backward through the whole network), the CAM upsampled to
    the input and resized again to the display, PNG at zlib's default level."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    predictor = explainer.predictor
    model = predictor.model

    class Explained(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.explainable_logits(x)

    class AtGrid(GradCAM):
        def get_target_width_height(self, input_tensor: torch.Tensor) -> None:
            return None

    prediction = predictor.predict(image)
    index = CLASS_NAMES.index(prediction.top_class)
    x = predictor.to_tensor([image])
    with AtGrid(model=Explained().eval(), target_layers=[model.cam_layer]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(index)])
    model.zero_grad(set_to_none=True)
    side = (predictor.img_size, predictor.img_size)
    full = np.clip(upsample_cam(np.nan_to_num(maps)[0], side, model.feature_grid()), 0, 1)
    picture = render(shrink_image(image, explainer.max_side, "long"), full, "overlay", 0.5)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(PROJECT_ROOT / "weights" / "default.pt"))
    p.add_argument("--images", type=int, default=64, help="distinct uploads (a multiple of 16)")
    p.add_argument("--image-size", default="427x320", help="WxH to re-encode at, or 'native'")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    p.add_argument("--seconds", type=float, default=3.0, help="length of one timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per cell (median)")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip torch.compile (minutes of compiling on a loaded machine)",
    )
    p.add_argument("--latency-calls", type=int, default=30, help="timed calls per latency row")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = load_checkpoint(args.checkpoint)
    datas, what = uploads(max(16, args.images // 16 * 16), parse_size(args.image_size))
    predictor = Predictor(dataclasses.replace(checkpoint, tta="none"))  # one view: the model call
    first = model_table(predictor, datas, args)
    second, third = predictor_table(checkpoint, datas, args)
    fourth = gradcam_table(checkpoint, datas[0], args)
    print(f"\n{machine_line(args.threads)}; model {args.checkpoint} "
          f"({checkpoint.img_size} px); {len(datas)} {what}; median of {args.repeats} "
          f"windows of {args.seconds:g} s\n")  # fmt: skip
    for table in (first, second, third, fourth):
        print("\n".join(table), "", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
