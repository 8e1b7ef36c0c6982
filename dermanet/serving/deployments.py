"""The model-side Serve deployments: a batched classifier and a Grad-CAM explainer.

Both decode the uploaded bytes themselves (so big images never travel between actors as
pixels) and return errors as values, so one bad image cannot fail the rest of its batch.
Models are picked per request by Serve model multiplexing; ids are registry ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch
from ray import serve

from dermanet.data.images import ImageDecodeError, ImageTooLargeError, decode_image
from dermanet.inference.gradcam import GradCamExplainer
from dermanet.inference.predictor import Predictor
from dermanet.inference.registry import ModelRegistry
from dermanet.inference.risk import RiskPolicy

log = logging.getLogger("ray.serve")

MAX_MODELS_PER_REPLICA = 3


def _error(status: int, message: str) -> dict[str, Any]:
    return {"ok": False, "status": status, "error": message}


def _decode(data: bytes, max_pixels: int) -> Any:
    """RGB array, or an error value; oversize images are a 413, the rest 422."""
    try:
        return decode_image(data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        return _error(413, str(exc))
    except ImageDecodeError as exc:
        return _error(422, str(exc))


class _RegistryBacked:
    """Shared constructor: the registry folder, risk policy and pixel limit."""

    def __init__(self, model_dir: str, risk: dict[str, Any], max_image_pixels: int):
        self.registry = ModelRegistry(model_dir)
        self.risk = RiskPolicy.from_mapping(risk)
        self.max_image_pixels = int(max_image_pixels)

    def _predictor(self, model_id: str) -> Predictor:
        started = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU only if Serve gave one
        predictor = Predictor(self.registry.load(model_id), self.risk, device=device)
        log.info("loaded model %r in %.2f s", model_id, time.perf_counter() - started)
        return predictor


@serve.deployment(
    name="Classifier",
    max_ongoing_requests=32,  # >= max_batch_size, or batches silently cap at 5
    ray_actor_options={"num_cpus": 1},
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
)
class Classifier(_RegistryBacked):
    """Classifies uploaded images in batches (`@serve.batch`), one model per sub-batch."""

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batch size and wait come from user_config, so the Serve config can change them live."""
        self.classify.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self.classify.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_predictor(self, model_id: str) -> Predictor:
        return await asyncio.to_thread(self._predictor, model_id)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify(self, uploads: list[bytes]) -> list[dict[str, Any]]:
        """Each item: {"ok": True, "prediction": {...}, "batch_size", "model_ms"} or an error."""
        predictor = await self.get_predictor(serve.get_multiplexed_model_id())
        return await asyncio.to_thread(self._classify, predictor, uploads)

    def _classify(self, predictor: Predictor, uploads: list[bytes]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        decoded = [_decode(data, self.max_image_pixels) for data in uploads]
        good = [i for i, item in enumerate(decoded) if not isinstance(item, dict)]
        predictions = predictor.predict_batch([decoded[i] for i in good])
        model_ms = (time.perf_counter() - started) * 1000
        results: list[dict[str, Any]] = list(decoded)
        for i, prediction in zip(good, predictions, strict=True):
            results[i] = {
                "ok": True,
                "prediction": prediction.to_dict(),
                "batch_size": len(uploads),
                "model_ms": model_ms,
            }
        return results


@serve.deployment(
    name="GradCam",
    max_ongoing_requests=4,
    ray_actor_options={"num_cpus": 0.5},
)
class GradCam(_RegistryBacked):
    """Renders Grad-CAM explanations; requests run one at a time per model (CAM hooks)."""

    def __init__(self, model_dir: str, risk: dict[str, Any], max_image_pixels: int, max_side: int):
        super().__init__(model_dir, risk, max_image_pixels)
        self.max_side = int(max_side)

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_explainer(self, model_id: str) -> GradCamExplainer:
        predictor = await asyncio.to_thread(self._predictor, model_id)
        return GradCamExplainer(predictor, max_side=self.max_side)

    async def explain(
        self, data: bytes, target: str | None, mode: str, opacity: float, include_cam: bool
    ) -> dict[str, Any]:
        """{"ok": True, "png": bytes, "cam": float list or None, ...} or an error value."""
        explainer = await self.get_explainer(serve.get_multiplexed_model_id())
        image = _decode(data, self.max_image_pixels)
        if isinstance(image, dict):
            return image
        result = await asyncio.to_thread(explainer.explain, image, target, mode, opacity)
        return {
            "ok": True,
            "png": result.png,
            "cam": result.cam.round(4).tolist() if include_cam else None,
            "target_class": result.target_class,
            "target_probability": result.target_probability,
            "prediction": result.prediction.to_dict(),
            "mode": result.mode,
            "opacity": result.opacity,
        }
