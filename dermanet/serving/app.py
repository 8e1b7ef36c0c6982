"""Assembling the Serve application: ingress → classifier + Grad-CAM, from ServeSettings."""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from dermanet.db import check_current, data_dir, database_url, engine_for
from dermanet.inference.registry import ModelRegistry
from dermanet.serving.deployments import Classifier, GradCam
from dermanet.serving.ingress import Ingress
from dermanet.serving.settings import ServeSettings

log = logging.getLogger(__name__)


def build_app(settings: ServeSettings | None = None) -> Application:
    """The bound application. Fails here, with what to do, when the registry has no model."""
    settings = settings or ServeSettings.from_env()
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    choice = registry.default()
    log.info("DermaNet serving %s; default model %r (%s)", registry.root, *_choice(choice))
    folder = data_dir(settings.data_dir)
    url = database_url(settings.database_url, folder)
    check_current(engine_for(url))  # an old or empty database: fail now, with the command
    settings = ServeSettings.from_mapping(
        {"model_dir": str(registry.root), "database_url": url, "data_dir": str(folder)},
        base=settings,
    )
    common = {
        "model_dir": str(registry.root),
        "risk": settings.risk.to_dict(),
        "max_image_pixels": settings.max_image_pixels,
        "default_model": settings.default_model,
    }
    backpressure = {"retry_after_s": settings.retry_after_s}
    classifier = Classifier.options(
        num_replicas=settings.classifier_replicas,
        ray_actor_options={"num_cpus": settings.classifier_num_cpus},
        max_ongoing_requests=settings.classifier_max_ongoing,
        max_queued_requests=settings.max_queued_requests,
        backpressure_config=backpressure,
        user_config={
            "max_batch_size": settings.max_batch_size,
            "batch_wait_timeout_s": settings.batch_wait_timeout_s,
        },
    ).bind(backend=settings.backend, **common)
    # the CAM is always torch's; the backend answers for a model served with several views
    explainer = GradCam.options(
        max_queued_requests=settings.gradcam_max_queued_requests,
        backpressure_config=backpressure,
    ).bind(max_side=settings.gradcam_max_side, backend=settings.backend, **common)
    return Ingress.bind(classifier, explainer, settings.to_dict())


def app_builder(args: dict[str, Any]) -> Application:
    """Builder for `serve run/deploy serve/config.yaml`: `args:` override env and defaults."""
    return build_app(ServeSettings.from_mapping(args, base=ServeSettings.from_env()))


def _choice(choice: Any) -> tuple[str, str]:
    return choice.model_id, choice.reason
