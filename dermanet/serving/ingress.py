"""The HTTP ingress: FastAPI routes in front of the classifier and Grad-CAM deployments.

It validates everything a person can get wrong (content type, size, model id, class, mode,
opacity) and turns each problem into a 4xx JSON `{"detail": ...}`; models run elsewhere.
Under faults it answers too: a full model queue is a quick 503 with `Retry-After`, a model
replica that dies mid-request is retried once on another one, and `/healthz/ready` says
whether the default model really answers.
"""

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette._utils import get_route_path
from starlette.datastructures import FormData

import dermanet
from dermanet.classes import CLASS_NAMES
from dermanet.inference.gradcam import RENDER_MODES
from dermanet.inference.predictor import UnknownClassError, resolve_class
from dermanet.inference.registry import (
    ModelRegistry,
    ModelUnavailableError,
    NoCheckpointsError,
    UnknownModelError,
)
from dermanet.inference.similar import MAX_K
from dermanet.serving import cases_context, cases_routes
from dermanet.serving.health import LoadChecks
from dermanet.serving.metrics import RequestMetricsMiddleware
from dermanet.serving.settings import ServeSettings
from dermanet.serving.trust_view import json_safe
from dermanet.serving.uploads import (
    ApiError,
    BodyLimitMiddleware,
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    Upload,
    check_sizes,
    read_uploads,
)

log = logging.getLogger("ray.serve")

ADMITTED_PATHS = frozenset({"/v1/classify", "/v1/similar"})  # the routes that call Classifiers


@dataclass(frozen=True)
class Admission:
    """The ingress's admission limit (None: none) and how long a shed request's 503 waits."""

    limit: int | None
    hold_s: float
    retry_after_s: float


class AdmissionMiddleware:
    """Sheds classify and similar requests beyond the admission limit with a JSON 503 and
    Retry-After, before the key check and before the body is read: under overload a refusal
    costs a path compare, not a database lookup, a multipart parse and a Classifier call. The
    503 goes out after `hold_s` (a timer: no CPU), so a client that resends at once costs at
    most one refusal per hold and connection instead of spinning the proxy and this process.
    Plain ASGI: no task per request."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app
        self.admitted = 0  # model requests in progress in this ingress process

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        admission = getattr(getattr(scope.get("app"), "state", None), "admission", None)
        if (
            scope["type"] != "http"
            or admission is None
            or admission.limit is None
            or get_route_path(scope) not in ADMITTED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        if self.admitted >= admission.limit:
            await asyncio.sleep(admission.hold_s)
            await _send_error(send, busy_error(f"{self.admitted} requests in progress",
                                               admission.retry_after_s))  # fmt: skip
            return
        self.admitted += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admitted -= 1


def busy_error(why: str, retry_after_s: float) -> ApiError:
    """The 503 of a full service: what is full and when to retry (header and body)."""
    return ApiError(503, f"DermaNet is busy: {why}; retry after {retry_after_s:g} s", retry_after_s)


async def _send_error(send: Send, error: ApiError) -> None:
    body, headers = error.response_parts()
    response = JSONResponse(body, status_code=error.status, headers=headers)
    await send(
        {"type": "http.response.start", "status": response.status_code,
         "headers": response.raw_headers}
    )  # fmt: skip
    await send({"type": "http.response.body", "body": response.body})


NOTICE = "Research software, not a medical device: never use this output for clinical decisions."
MODEL_QUERY = Query(
    None, description="registry model id (GET /v1/models); unset: the default model"
)
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (JPEG, PNG, ...)",
                        }
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERRORS = {
    code: {"description": text, "content": {"application/json": {"example": {"detail": "..."}}}}
    for code, text in {
        400: "empty upload or malformed form",
        404: "unknown model id",
        413: "body or image too large",
        415: "not multipart or an image content type",
        422: "not a readable image, unknown class, bad mode or opacity",
        503: "model not usable, registry empty, or busy (then with Retry-After: try again)",
    }.items()
}

SIMILAR_ERRORS = ERRORS | {
    404: ERRORS[404] | {"description": "unknown model id, or a model without a similar-cases "
                        "index (the detail says the command that builds it)"},
    409: {"description": "the index was built from another model file (rebuild command in the "
          "detail)", "content": ERRORS[404]["content"]},
    422: ERRORS[422] | {"description": f"not a readable image, or k outside 1..{MAX_K}"},
}  # fmt: skip
DEFAULT_K = 8

api = FastAPI(
    title="DermaNet",
    version=dermanet.__version__,
    description="Dermoscopic skin-lesion classification and Grad-CAM. " + NOTICE,
)
api.add_middleware(BodyLimitMiddleware, default=ServeSettings().max_body_bytes)
cases_routes.install(api)  # keys on every /v1 route; cases, diagnoses, audit, /v1/me
api.add_middleware(AdmissionMiddleware)  # sheds before the key check and the body
api.add_middleware(RequestMetricsMiddleware)  # outermost: counts the 413s and 503s above too


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    body, headers = exc.response_parts()
    return JSONResponse(body, status_code=exc.status, headers=headers)


@api.exception_handler(BodyTooLarge)
async def _too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=413)


def _registry_error(exc: Exception) -> ApiError:
    if isinstance(exc, UnknownModelError):
        return ApiError(404, str(exc))
    if isinstance(exc, (ModelUnavailableError, NoCheckpointsError)):
        return ApiError(503, str(exc))
    raise exc


T = TypeVar("T")


def _replica_lost(exc: BaseException) -> bool:
    """The replica died or vanished under the request (not an error of the request itself)."""
    lost = (RayActorError, ReplicaUnavailableError)
    return isinstance(exc, lost) or isinstance(getattr(exc, "cause", None), lost)


async def call_model(call: Callable[[], Awaitable[T]], what: str, retry_after_s: float) -> T:
    """Await a model call; retry it once when its replica dies (classify and Grad-CAM are
    idempotent, and Serve's router has by then struck the dead replica off); a full queue or a
    deployment that is down become 503s with Retry-After instead of a 500."""
    for attempt in (1, 2):
        try:
            return await call()
        except BackPressureError as exc:
            wait = exc.retry_after_s if exc.retry_after_s is not None else retry_after_s
            raise busy_error(f"the {what} queue is full", wait) from None
        except DeploymentUnavailableError:
            raise ApiError(
                503, f"the {what} is not running; retry later", retry_after_s=retry_after_s
            ) from None
        except Exception as exc:
            if not _replica_lost(exc):
                raise
            log.warning("%s replica lost during a request (attempt %d): %s", what, attempt, exc)
    raise ApiError(
        503,
        f"the {what} replica stopped twice while answering; retry in a moment",
        retry_after_s=retry_after_s,
    )


def _form_value(form: Any, name: str, fallback: Any) -> Any:
    value = form.get(name) if form is not None else None
    return fallback if value in (None, "") else value


def _as_bool(value: Any, name: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ApiError(422, f"{name} must be true or false, got {value!r}")


def _as_k(value: Any) -> int:
    """The number of neighbours asked for: a whole number in 1..MAX_K (else a 422)."""
    try:
        k = int(str(value).strip())
    except ValueError:
        raise ApiError(422, f"k must be a whole number from 1 to {MAX_K}, got {value!r}") from None
    if not 1 <= k <= MAX_K:
        raise ApiError(422, f"k must be from 1 to {MAX_K}, got {k}")
    return k


def _check_outcome(outcome: dict[str, Any], upload: Upload, several: bool) -> None:
    if not outcome.get("ok"):
        prefix = f"{upload.filename}: " if several else ""
        raise ApiError(int(outcome["status"]), prefix + outcome["error"])


@serve.deployment(
    name="Ingress",
    # Far above the classifier's capacity, so overload reaches the classifier's bounded queue
    # and is shed here as a JSON 503; the proxy sheds (plain-text 503) only past this.
    max_ongoing_requests=256,
    max_queued_requests=64,
    backpressure_config={"retry_after_s": 1},
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress(api)
class Ingress:
    """Routes: /healthz[/live|/ready], /v1/models, /v1/classify, /v1/similar, /v1/gradcam
    (docs at /docs)."""

    def __init__(self, classifier: DeploymentHandle, explainer: DeploymentHandle, settings: dict):
        self.settings = ServeSettings.from_mapping(settings)
        self.registry = ModelRegistry(self.settings.model_dir, self.settings.default_model)
        self.classifier = classifier
        self.explainer = explainer
        self.load_checks = LoadChecks()
        api.state.max_body_bytes = self.settings.max_body_bytes
        api.state.admission = Admission(
            self.settings.admission_capacity,
            self.settings.shed_hold_s,
            self.settings.retry_after_s,
        )
        cases_context.configure(
            self.settings.database_url,
            self.settings.data_dir,
            lambda request: self.classify(request, model=None),
        )
        choice = self.registry.default()
        log.info("registry %s; default %r (%s)", self.registry.root, choice.model_id, choice.reason)

    async def _model_id(self, requested: str | None) -> str:
        """A usable registry id: listed, readable, and loading (checked once per file)."""
        try:
            info = self.registry.resolve(requested or None)
        except (UnknownModelError, ModelUnavailableError, NoCheckpointsError) as exc:
            raise _registry_error(exc) from None
        error = await self.load_checks.error(info)
        if error is not None:
            raise ApiError(503, f"model {info.model_id!r} cannot be used: {error}")
        return info.model_id

    async def _uploaded(
        self, request: Request, model: str | None, max_files: int
    ) -> tuple[list[Upload], FormData | None, str]:
        """An upload route's first step: the images (sizes checked), the form (for its other
        fields; a form's `model` field overrides the query's) and the usable model id."""
        uploads, form = await read_uploads(request, max_files)
        check_sizes(uploads, max_files)
        return uploads, form, await self._model_id(_form_value(form, "model", model))

    def _call(self, call: Callable[[], Awaitable[T]], what: str) -> Awaitable[T]:
        return call_model(call, what, self.settings.retry_after_s)

    @api.get("/healthz/live", summary="Liveness: the HTTP process answers")
    async def live(self) -> dict[str, Any]:
        return {"status": "live"}

    @api.get("/healthz/ready", summary="Readiness: the default model is loaded and answering")
    async def ready(self) -> JSONResponse:
        """200 when a classifier replica has the default model loaded and a tiny forward pass
        passes, within ready_timeout_s; else 503 with what is wrong (busy: with Retry-After)."""
        try:
            model_id = await self._model_id(None)
        except ApiError as exc:  # no usable default: missing, unreadable or fails to load
            return self._not_ready("unavailable", exc)
        handle = self.classifier.options(multiplexed_model_id=model_id)
        try:
            probe = await asyncio.wait_for(
                self._call(lambda: handle.probe.remote(), "classifier"),
                self.settings.ready_timeout_s,
            )
        except TimeoutError:
            message = (
                f"no classifier replica answered a probe of {model_id!r} within "
                f"{self.settings.ready_timeout_s:g} s (starting, or overloaded)"
            )
            return self._not_ready("not_ready", ApiError(503, message, self.settings.retry_after_s))
        except ApiError as exc:
            return self._not_ready("busy" if exc.retry_after_s else "unavailable", exc)
        if not probe.get("ok"):
            return self._not_ready("unavailable", ApiError(503, probe["error"]))
        return JSONResponse(
            {
                "status": "ok",
                "live": True,
                "ready": True,
                "default_model": model_id,
                "forward_ms": probe["forward_ms"],
            }
        )

    @api.get("/healthz", summary="Readiness (as /healthz/ready) and the default model")
    async def healthz(self) -> JSONResponse:
        return await self.ready()

    @staticmethod
    def _not_ready(status: str, exc: ApiError) -> JSONResponse:
        body, headers = exc.response_parts()
        body.update(status=status, live=True, ready=False)
        return JSONResponse(body, status_code=503, headers=headers)

    @api.get("/v1/models", summary="Checkpoints in the registry and the default", responses=ERRORS)
    async def models(self) -> dict[str, Any]:
        """Every file, with `usable: false` and the reason when it cannot be read or loaded, and
        for usable ones what their gate checks and how their prediction sets were calibrated."""
        try:
            infos = self.registry.list()
            choice = self.registry.default()
        except (UnknownModelError, NoCheckpointsError) as exc:
            raise _registry_error(exc) from None
        checked = await asyncio.gather(*(self.load_checks.checked(info) for info in infos))
        return {
            "default": choice.model_id,
            "default_reason": choice.reason,
            "models": [info.to_dict() | trust for info, trust in checked],
            "class_names": list(CLASS_NAMES),
            "risk_policy": self.settings.risk.to_dict(),
        }

    @api.post(
        "/v1/classify",
        summary="Class probabilities, risk and traffic light for one or more images",
        openapi_extra=UPLOAD_BODY,
        responses=ERRORS,
    )
    async def classify(self, request: Request, model: str | None = MODEL_QUERY) -> dict[str, Any]:
        started = time.perf_counter()
        uploads, _, model_id = await self._uploaded(request, model, self.settings.max_files)
        handle = self.classifier.options(multiplexed_model_id=model_id)
        outcomes = await asyncio.gather(
            *(self._call(lambda u=u: handle.classify.remote(u.data), "classifier") for u in uploads)
        )
        several = len(uploads) > 1
        for outcome, upload in zip(outcomes, uploads, strict=True):
            _check_outcome(outcome, upload, several)
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        results = [
            {
                "model_id": model_id,
                "filename": upload.filename,
                **outcome["prediction"],
                "batch_size": outcome["batch_size"],
                "latency_ms": latency_ms,
            }
            for outcome, upload in zip(outcomes, uploads, strict=True)
        ]
        await cases_routes.audit_classify(request, uploads, results)
        # each result carries the gate, the prediction set and its coverage as computed; JSON
        # has no NaN/infinity, so a non-finite number (e.g. a stored threshold) becomes null
        if not several:
            return json_safe(results[0])
        return json_safe({"model_id": model_id, "latency_ms": latency_ms, "results": results})

    @api.post(
        "/v1/similar",
        summary="The k most similar confirmed training cases of one image and their vote",
        openapi_extra=UPLOAD_BODY,
        responses=SIMILAR_ERRORS,
    )
    async def similar(
        self,
        request: Request,
        model: str | None = MODEL_QUERY,
        k: str = Query(str(DEFAULT_K), description=f"neighbours to return, 1..{MAX_K}"),
    ) -> dict[str, Any]:
        """Exact cosine search over the model's `<model id>.index.parquet`: `neighbours`
        (image, label, distance = 1 - cosine, thumbnail as base64 JPEG or null) nearest first,
        and `knn_probabilities`, their class-balanced vote. The upload's `gate` says whether it
        looks like the images the model knows; when it does not, the neighbours mean little."""
        started = time.perf_counter()
        uploads, form, model_id = await self._uploaded(request, model, max_files=1)
        count = _as_k(_form_value(form, "k", k))
        handle = self.classifier.options(multiplexed_model_id=model_id)
        outcome = await self._call(
            lambda: handle.similar.remote(uploads[0].data, count), "classifier"
        )
        _check_outcome(outcome, uploads[0], several=False)
        answer = {key: value for key, value in outcome.items() if key != "ok"}
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        return json_safe({"model_id": model_id, **answer, "latency_ms": latency_ms})

    @api.post(
        "/v1/gradcam",
        summary="Grad-CAM heatmap (PNG; JSON with the raw CAM on request)",
        openapi_extra=UPLOAD_BODY,
        responses={200: {"content": {"image/png": {}}}, **ERRORS},
    )
    async def gradcam(
        self,
        request: Request,
        model: str | None = MODEL_QUERY,
        target_class: str | None = Query(
            None, description=f"class name {list(CLASS_NAMES)} or index; default: predicted"
        ),
        mode: str = Query("overlay", description=f"one of {list(RENDER_MODES)}"),
        opacity: float = Query(0.5, description="heatmap opacity in the overlay, 0..1"),
        include_cam: bool = Query(False, description="JSON with the PNG and the raw CAM"),
    ) -> Response:
        started = time.perf_counter()
        uploads, form, model_id = await self._uploaded(request, model, max_files=1)
        target = _form_value(form, "target_class", target_class)
        mode = str(_form_value(form, "mode", mode)).replace("-", "_")
        if target is not None:
            try:
                target = CLASS_NAMES[resolve_class(target)]
            except UnknownClassError as exc:
                raise ApiError(422, str(exc)) from None
        if mode not in RENDER_MODES:
            raise ApiError(422, f"unknown mode {mode!r}; use one of {list(RENDER_MODES)}")
        try:
            opacity = float(_form_value(form, "opacity", opacity))
        except ValueError:
            raise ApiError(422, "opacity must be a number between 0 and 1") from None
        if not 0.0 <= opacity <= 1.0:
            raise ApiError(422, f"opacity must be between 0 and 1, got {opacity}")
        want_cam = _as_bool(_form_value(form, "include_cam", include_cam), "include_cam")
        handle = self.explainer.options(multiplexed_model_id=model_id)
        outcome = await self._call(
            lambda: handle.explain.remote(uploads[0].data, target, mode, opacity, want_cam),
            "Grad-CAM",
        )
        _check_outcome(outcome, uploads[0], several=False)
        latency_ms = round((time.perf_counter() - started) * 1000, 2)
        if want_cam:
            body = {k: v for k, v in outcome.items() if k not in ("ok", "png")}
            body.update(
                model_id=model_id,
                png_base64=base64.b64encode(outcome["png"]).decode("ascii"),
                cam_shape=[len(outcome["cam"]), len(outcome["cam"][0])],
                latency_ms=latency_ms,
            )
            return JSONResponse(json_safe(body))
        gate = outcome["prediction"].get("gate") or {}
        version = outcome["model"]
        headers = {
            "X-DermaNet-Model": model_id,
            "X-DermaNet-Model-Sha256": version["sha256"],
            "X-DermaNet-Model-Created": version["created"],
            "X-DermaNet-Target-Class": outcome["target_class"],
            "X-DermaNet-Target-Probability": f"{outcome['target_probability']:.6f}",
            "X-DermaNet-Top-Class": outcome["prediction"]["top_class"],
            "X-DermaNet-Traffic-Light": str(outcome["prediction"]["traffic_light"]),
            "X-DermaNet-Gate-Accepted": "true" if gate.get("accepted", True) else "false",
            "X-DermaNet-Latency-Ms": f"{latency_ms}",
        }
        return Response(outcome["png"], media_type="image/png", headers=headers)
