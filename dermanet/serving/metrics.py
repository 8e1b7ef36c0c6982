"""DermaNet's own Prometheus metrics, recorded with `ray.util.metrics` in the Serve replicas.

Ray exports them on every node's metrics endpoint (`ray.nodes()` → `MetricsExportPort`) with a
`ray_` prefix; a counter `x` is served as `ray_x_total`, a histogram `x` as `ray_x_bucket`,
`_sum` and `_count`. `METRICS` declares each one once: the recorders below, the Grafana
dashboard's and the alert rules' tests read the served names from it (`exported_names`).

Labels stay a small fixed vocabulary: route templates (never raw paths), HTTP status codes,
refusal kinds (a quality check's name or "ood", dermanet.monitoring.reasons), class names and
model files. No image, user or request ids.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from starlette.routing import Match

from dermanet.monitoring.reasons import OTHER, reason_kinds

PREFIX = "ray_"  # Ray's metrics export prefixes every name
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The gate's OOD scores are centred and scaled per part (the shipped model refuses above about 3.7).
# Ray takes only positive bucket bounds and no negative values: scores at or below 0.25 (typical
# images, negative ones recorded as 0) share the first bucket.
OOD_BUCKETS = (0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0)
UNMATCHED = "unmatched"  # the route label of a path no route matches (a 404)


@dataclass(frozen=True)
class Metric:
    """One metric as declared to Ray: its name (without `ray_` and `_total`), kind and labels."""

    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    def exported(self) -> tuple[str, ...]:
        """The names Prometheus sees for this metric."""
        base = PREFIX + self.name
        if self.kind == "counter":
            return (base + "_total",)
        if self.kind == "histogram":
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)

    def build(self) -> Any:
        """The `ray.util.metrics` object (inside a Ray worker: a replica or an actor)."""
        from ray.util import metrics

        if self.kind == "counter":
            return metrics.Counter(self.name, self.description, tag_keys=self.tags)
        if self.kind == "histogram":
            return metrics.Histogram(
                self.name, self.description, list(self.boundaries), tag_keys=self.tags
            )
        return metrics.Gauge(self.name, self.description, tag_keys=self.tags)


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "dermanet_requests",
            "counter",
            "HTTP requests the DermaNet ingress answered, by route template and status code",
            ("route", "status"),
        ),
        Metric(
            "dermanet_request_seconds",
            "histogram",
            "Time from request to answer in the DermaNet ingress, by route template",
            ("route",),
            LATENCY_BUCKETS_S,
        ),
        Metric(
            "dermanet_gate_refusals",
            "counter",
            "Classified images the trust gate refused, by first reason (quality check name or ood)",
            ("reason",),
        ),
        Metric(
            "dermanet_predictions",
            "counter",
            "Top class of classified images the trust gate accepted",
            ("label",),
        ),
        Metric(
            "dermanet_ood_score",
            "histogram",
            "The trust gate's OOD score of classified images (models with OOD statistics)",
            (),
            OOD_BUCKETS,
        ),
        Metric(
            "dermanet_model_info",
            "gauge",
            "1 for each model file a classifier replica has loaded (registry id, file SHA-256)",
            ("id", "sha256"),
        ),
    )
}


def exported_names() -> set[str]:
    """Every metric name DermaNet's code serves (through Ray's export)."""
    return {name for metric in METRICS.values() for name in metric.exported()}


class ServiceMetrics:
    """The recorders of one process (a Serve replica); build once with `service_metrics()`."""

    def __init__(self) -> None:
        self._m = {name: metric.build() for name, metric in METRICS.items()}

    def request(self, route: str, status: int, seconds: float) -> None:
        self._m["dermanet_requests"].inc(1, {"route": route, "status": str(status)})
        self._m["dermanet_request_seconds"].observe(seconds, {"route": route})

    def answers(self, predictions: Iterable[Mapping[str, Any]]) -> None:
        """Count classified images: the top class when the gate accepted, else the kind of its
        first reason (the gate lists quality checks before OOD), so refusals plus predictions
        is every classified image; and the OOD score whenever one was computed."""
        for prediction in predictions:
            gate = prediction.get("gate") or {}
            if gate.get("accepted", True):
                self._m["dermanet_predictions"].inc(1, {"label": str(prediction["top_class"])})
            else:
                kind = (reason_kinds(gate.get("reasons")) or [OTHER])[0]
                self._m["dermanet_gate_refusals"].inc(1, {"reason": kind})
            score = _number(gate.get("ood_score"))
            if score is not None:  # OpenTelemetry drops negative values: they count as 0
                self._m["dermanet_ood_score"].observe(max(score, 0.0))

    def model(self, model_id: str, sha256: str) -> None:
        self._m["dermanet_model_info"].set(1, {"id": model_id, "sha256": sha256})


def _number(value: Any) -> float | None:
    """A finite float from a Python or NumPy number, else None."""
    if value is None or isinstance(value, bool | str):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@functools.cache
def service_metrics() -> ServiceMetrics:
    """This process's recorders (Ray registers a metric once per name and process)."""
    return ServiceMetrics()


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RequestMetricsMiddleware:
    """ASGI middleware counting every answer of the app by route template and status, with
    its latency. Plain ASGI (not `BaseHTTPMiddleware`): it adds no task per request."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception escaping the app becomes a 500 further out

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            service_metrics().request(route_template(scope), status, time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The route template of a request: the one routing chose, or, for an answer given before
    routing (a 401 of the key check, an early 413, a shed 503), the route the path matches."""
    chosen = getattr(scope.get("route"), "path", None)
    if chosen:
        return chosen
    router = getattr(scope.get("app"), "router", None)
    full, partial = _match(getattr(router, "routes", ()), scope)
    return full or partial or UNMATCHED


def _match(routes: Iterable[Any], scope: Scope) -> tuple[str | None, str | None]:
    """The first route path matching the request fully, and the first matching its path only
    (another method); routers included in the app are searched through their own routes."""
    partial = None
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:  # FastAPI's included router: match its routes themselves
            found, maybe = _match(inner, scope)
        else:
            match, _ = route.matches(scope)
            path = getattr(route, "path", None)
            found = path if match is Match.FULL else None
            maybe = path if match is Match.PARTIAL else None
        if found:
            return found, partial
        partial = partial or maybe
    return None, partial
