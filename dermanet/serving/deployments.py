"""The model-side Serve deployments: a batched classifier and a Grad-CAM explainer.

Both decode the uploaded bytes themselves (so big images never travel between actors as
pixels) and return errors as values, so one bad image cannot fail the rest of its batch.
Models are picked per request by Serve model multiplexing; ids are registry ids.

Resilience: each replica loads the default model before it takes traffic, uses as many torch
threads as Ray gave it CPUs, and answers Serve's `check_health` only while every model it has
loaded still passes a tiny forward pass; a model that fails to load is an error value (503).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from ray import serve

from dermanet.data.images import ImageDecodeError, ImageTooLargeError
from dermanet.inference.checkpoint import CheckpointError
from dermanet.inference.gradcam import GradCamExplainer
from dermanet.inference.predictor import Predictor
from dermanet.inference.registry import ModelRegistry, RegistryError
from dermanet.inference.risk import RiskPolicy
from dermanet.inference.similar import (
    IndexCache,
    IndexMismatchError,
    IndexMissingError,
    IndexUnreadableError,
    file_sha256,
)
from dermanet.runtime import use_assigned_cpus
from dermanet.serving.health import ModelCheckError, smoke_test
from dermanet.serving.metrics import service_metrics

log = logging.getLogger("ray.serve")

MAX_MODELS_PER_REPLICA = 3
# ModelCheckError: the file loads but its served path fails (e.g. trust statistics that do not
# fit the model); a load error (503 saying why), never a replica failing health checks forever
LOAD_ERRORS = (RegistryError, CheckpointError, OSError, ModelCheckError)


def _error(status: int, message: str) -> dict[str, Any]:
    return {"ok": False, "status": status, "error": message}


def _decode(model: Predictor | GradCamExplainer, data: bytes, max_pixels: int) -> Any:
    """RGB array decoded for this model (`decode`: a JPEG at a reduced DCT scale towards the
    model's size), or an error value; oversize images are a 413, the rest 422."""
    try:
        return model.decode(data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        return _error(413, str(exc))
    except ImageDecodeError as exc:
        return _error(422, str(exc))


def _load_error(model_id: str, exc: Exception) -> dict[str, Any]:
    return _error(503, f"model {model_id!r} could not be loaded on the server: {exc}")


class _RegistryBacked:
    """Shared constructor (registry, risk policy, pixel limit), model loading and health."""

    async def __init__(  # type: ignore[misc]  # Serve runs async constructors
        self,
        model_dir: str,
        risk: dict[str, Any],
        max_image_pixels: int,
        default_model: str | None = None,
        backend: str = "auto",
        **options: Any,
    ):
        """`options` are the deployment's own (`configure`); the default model is loaded
        (`model_for`) before the replica takes traffic."""
        self.registry = ModelRegistry(model_dir, default_model)
        self.backend = backend  # the model call (Predictor backend); CAMs are always torch's
        self.risk = RiskPolicy.from_mapping(risk)
        self.max_image_pixels = int(max_image_pixels)
        self.threads = use_assigned_cpus()
        # what this replica has loaded; entries vanish when multiplexing evicts the model
        self.loaded: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self.configure(**options)
        await self._preload_default(self.model_for)

    def configure(self) -> None:
        """Set up what the deployment adds to the shared state (nothing by default)."""

    async def model_for(self, model_id: str) -> Any:
        """The loaded model object this deployment answers with (multiplexed per id)."""
        raise NotImplementedError

    def _predictor(self, model_id: str) -> Predictor:
        started = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU only if Serve gave one
        predictor = Predictor(
            self.registry.load(model_id), self.risk, device=device, backend=self.backend
        )
        smoke_test(predictor)  # the whole served path answers before the model takes requests
        log.info("loaded model %r in %.2f s", model_id, time.perf_counter() - started)
        return predictor

    def _smoke_test(self, model: Any) -> None:
        """One tiny pass through a loaded model object; raises when it does not answer."""
        smoke_test(model)

    async def _preload_default(self, load: Callable[[str], Awaitable[Any]]) -> None:
        """Load the default model before taking traffic; a bad registry is logged, not fatal
        (a replica that crash-loops on it would help nobody; /healthz/ready says what is wrong)."""
        try:
            model_id = self.registry.default().model_id
            await load(model_id)
        except LOAD_ERRORS as exc:
            log.warning("no default model preloaded: %s", exc)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes Serve replace the replica.
        Healthy = every model loaded here still gives valid probabilities on a tiny input."""
        for model_id, model in list(self.loaded.items()):
            try:
                await asyncio.to_thread(self._smoke_test, model)
            except Exception as exc:
                raise RuntimeError(f"model {model_id!r} stopped answering: {exc}") from exc


@serve.deployment(
    name="Classifier",
    num_replicas=2,  # a dying replica must not stop the answers
    max_ongoing_requests=32,  # >= max_batch_size, or batches silently cap at 5
    max_queued_requests=32,  # per caller; beyond it callers get BackPressureError (-> 503)
    backpressure_config={"retry_after_s": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    ray_actor_options={"num_cpus": 0.5},
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.01},
)
class Classifier(_RegistryBacked):
    """Classifies uploaded images in batches (`@serve.batch`), one model per sub-batch."""

    def configure(self) -> None:
        self.indexes = IndexCache(MAX_MODELS_PER_REPLICA)  # similar cases, once per model

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Batch size and wait come from user_config, so the Serve config can change them live."""
        self.classify.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self.classify.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_predictor(self, model_id: str) -> Predictor:
        predictor = await asyncio.to_thread(self._predictor, model_id)
        self.loaded[model_id] = predictor
        sha256 = await asyncio.to_thread(file_sha256, self.registry.get(model_id).path)
        service_metrics().model(model_id, sha256)
        return predictor

    model_for = get_predictor

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def classify(self, uploads: list[bytes]) -> list[dict[str, Any]]:
        """Each item: {"ok": True, "prediction": {...}, "batch_size", "model_ms"} or an error."""
        model_id = serve.get_multiplexed_model_id()
        try:
            predictor = await self.get_predictor(model_id)
        except LOAD_ERRORS as exc:
            return [_load_error(model_id, exc)] * len(uploads)
        results = await asyncio.to_thread(self._classify, predictor, uploads)
        service_metrics().answers(item["prediction"] for item in results if item.get("ok"))
        return results

    async def probe(self) -> dict[str, Any]:
        """Readiness: the requested model is loaded on this replica and answers a tiny input."""
        model_id = serve.get_multiplexed_model_id()
        try:
            predictor = await self.get_predictor(model_id)
        except LOAD_ERRORS as exc:
            return _load_error(model_id, exc)
        forward_ms = await asyncio.to_thread(smoke_test, predictor)
        return {"ok": True, "model_id": model_id, "forward_ms": round(forward_ms, 2)}

    async def similar(self, data: bytes, k: int) -> dict[str, Any]:
        """The k nearest confirmed training cases of one upload and their vote, with the
        upload's gate; or an error value: no index (404), an index built from another model
        file (409) or one that cannot be read (503), each with the command that builds one."""
        model_id = serve.get_multiplexed_model_id()
        try:
            predictor = await self.get_predictor(model_id)
        except LOAD_ERRORS as exc:
            return _load_error(model_id, exc)
        return await asyncio.to_thread(self._similar, predictor, model_id, data, k)

    def _similar(self, predictor: Predictor, model_id: str, data: bytes, k: int) -> dict[str, Any]:
        try:
            info = self.registry.get(model_id)
            index = self.indexes.get(info.path, info.provenance)
        except RegistryError as exc:
            return _load_error(model_id, exc)
        except IndexMissingError as exc:
            return _error(404, str(exc))
        except IndexMismatchError as exc:
            return _error(409, str(exc))
        except IndexUnreadableError as exc:
            return _error(503, str(exc))
        image = _decode(predictor, data, self.max_image_pixels)
        if isinstance(image, dict):
            return image
        prediction = predictor.predict(image)
        return {
            "ok": True,
            **index.similar(prediction.features, k).to_dict(),
            "model": prediction.to_dict()["model"],
            "gate": prediction.gate,
            "probabilities_trusted": prediction.accepted,
            "index_rows": len(index),
        }

    def _classify(self, predictor: Predictor, uploads: list[bytes]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        decoded = [_decode(predictor, data, self.max_image_pixels) for data in uploads]
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
    max_queued_requests=8,
    backpressure_config={"retry_after_s": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    ray_actor_options={"num_cpus": 0.5},
)
class GradCam(_RegistryBacked):
    """Renders Grad-CAM explanations (on torch one at a time per model: CAM hooks)."""

    def configure(self, max_side: int) -> None:  # type: ignore[override]
        self.max_side = int(max_side)  # the rendered image's longer side, px

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_explainer(self, model_id: str) -> GradCamExplainer:
        predictor = await asyncio.to_thread(self._predictor, model_id)
        explainer = GradCamExplainer(predictor, max_side=self.max_side)
        self.loaded[model_id] = explainer
        return explainer

    model_for = get_explainer

    def _smoke_test(self, model: Any) -> None:
        """A whole tiny explanation (forward, backward, render) under the explainer's lock."""
        side = model.predictor.img_size
        model.explain(np.full((side, side, 3), 128, dtype=np.uint8), None, "heatmap", 0.5)

    async def explain(
        self, data: bytes, target: str | None, mode: str, opacity: float, include_cam: bool
    ) -> dict[str, Any]:
        """{"ok": True, "png": bytes, "cam": float list or None, ...} or an error value."""
        model_id = serve.get_multiplexed_model_id()
        try:
            explainer = await self.get_explainer(model_id)
        except LOAD_ERRORS as exc:
            return _load_error(model_id, exc)
        image = _decode(explainer, data, self.max_image_pixels)
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
            "model": result.prediction.to_dict()["model"],
            "mode": result.mode,
            "opacity": result.opacity,
        }
