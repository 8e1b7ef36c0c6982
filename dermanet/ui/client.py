"""The dashboard's only way to the models: a small HTTP client of the Serve API (`/v1`).

Every failure becomes a `ServeError` whose message a person can act on: the server cannot be
reached (`ServeUnavailable`, with the URL and how to start it), it stayed busy (`ServeBusy`:
503 with `Retry-After`, retried after the advised delay until a time budget runs out), or it
answered 4xx/5xx (the server's `detail`). Risk, traffic light, bars and the trust fields
(the gate's verdict, the prediction set) are taken from the server as they are, and so are the
similar confirmed cases (`/v1/similar`) and their vote.
"""

from __future__ import annotations

import base64
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from dermanet.answer import Answer, ModelVersion
from dermanet.classes import CLASS_NAMES

SERVE_URL_ENV = "DERMANET_SERVE_URL"
DEFAULT_SERVE_URL = "http://127.0.0.1:8000"
MAX_FILES_PER_REQUEST = 16  # the server's default `max_files`
START_HINT = "start it with `make demo` or `python -m dermanet.serving`, or fix the URL"
BUSY_BUDGET_S = 20.0  # how long the dashboard keeps retrying a busy server before it says so
MAX_RETRY_AFTER_S = 10.0  # never sleep longer than this on one Retry-After
MIN_RETRY_S = 0.5  # nor shorter ("Retry-After: 0" must not become a busy loop)


def default_serve_url(env: Mapping[str, str] | None = None) -> str:
    """$DERMANET_SERVE_URL, else http://127.0.0.1:8000."""
    env = os.environ if env is None else env
    return normalize_url(env.get(SERVE_URL_ENV) or DEFAULT_SERVE_URL)


def normalize_url(url: str) -> str:
    """`host:port` or `http(s)://host:port/` → `http(s)://host:port` (no trailing slash)."""
    text = str(url).strip().rstrip("/")
    if not text:
        raise ServeError(f"the server URL is empty; e.g. {DEFAULT_SERVE_URL}")
    if "://" not in text:
        text = "http://" + text
    scheme = text.split("://", 1)[0].lower()
    if scheme not in ("http", "https"):
        raise ServeError(f"the server URL must start with http:// or https://, got {url!r}")
    return text


class ServeError(Exception):
    """A request the server refused (status set) or could not answer; `str()` says why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServeUnavailable(ServeError):
    """Nothing answered at the URL (refused, timed out, DNS) or it is not DermaNet."""


class ServeBusy(ServeUnavailable):
    """The server kept answering 503 + Retry-After (overloaded) until the retry budget ran out.

    A ServeUnavailable (status None): the request itself is fine, so nothing about the images
    is recorded as their error; the page says the server is busy and to try again shortly.
    """

    def __init__(self, message: str, attempts: int, waited_s: float):
        super().__init__(message)
        self.attempts = attempts
        self.waited_s = waited_s


class NotSignedIn(ServeError):
    """401: no key, or one the server does not know (wrong or revoked): sign in again."""


@dataclass(frozen=True)
class ModelListing:
    """`GET /v1/models`: the registry's checkpoints, the default and the server's risk policy."""

    default: str
    default_reason: str
    models: list[dict[str, Any]]
    class_names: list[str]
    risk_policy: dict[str, Any] = field(default_factory=dict)

    @property
    def usable_ids(self) -> list[str]:
        return [m["id"] for m in self.models if m.get("usable", True)]

    @property
    def unusable(self) -> list[dict[str, Any]]:
        return [m for m in self.models if not m.get("usable", True)]

    def info(self, model_id: str) -> dict[str, Any]:
        return next((m for m in self.models if m["id"] == model_id), {})

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ModelListing:
        return cls(
            default=str(body["default"]),
            default_reason=str(body.get("default_reason", "")),
            models=list(body.get("models", [])),
            class_names=list(body.get("class_names", CLASS_NAMES)),
            risk_policy=dict(body.get("risk_policy") or {}),
        )


@dataclass(frozen=True)
class Classification(Answer):
    """One image's answer from `POST /v1/classify`, exactly as the server computed it: the
    answer schema (`dermanet.answer.Answer`) plus the request's model id and file name.

    When the server's gate refused the image (`refused`: not a dermoscopic image, or unlike
    the model's training images), it claims no risk: `risk`, `malignant` and `benign` are
    None, the traffic light is "unknown" and the probabilities are kept but not trusted.
    `prediction_set` lists the plausible classes (most probable first) that contain the true
    one with probability `set_coverage`; None when the model has no conformal statistics.
    """

    model_id: str = ""
    filename: str = ""

    @property
    def refused(self) -> bool:
        return not self.accepted

    @property
    def probabilities_trusted(self) -> bool:
        return self.accepted

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(self.gate["reasons"])

    @property
    def ood_score(self) -> float | None:
        return self.gate["ood_score"]

    @property
    def ood_threshold(self) -> float | None:
        return self.gate["ood_threshold"]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Classification:
        """Parse one result; a server from before the gate (no `gate` field) accepted all."""
        return cls.from_dict(
            body, model_id=str(body["model_id"]), filename=str(body.get("filename", ""))
        )

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"model_id": self.model_id, "filename": self.filename}


@dataclass(frozen=True)
class SimilarCase:
    """One confirmed training case near the uploaded image (`distance` = 1 - cosine)."""

    image: str
    label: str
    distance: float
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class SimilarCases:
    """`POST /v1/similar`: the nearest confirmed cases and their class vote, as the server
    found them; `accepted` is the upload's gate (a refused image's neighbours mean little)."""

    model_id: str
    neighbours: tuple[SimilarCase, ...]
    knn_probabilities: dict[str, float]
    knn_top_class: str
    vote: str = "class-balanced"
    accepted: bool = True
    index_rows: int | None = None
    model: ModelVersion | None = None

    @property
    def k(self) -> int:
        return len(self.neighbours)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> SimilarCases:
        neighbours = tuple(
            SimilarCase(
                image=str(item["image"]),
                label=str(item["label"]),
                distance=float(item["distance"]),
                thumbnail=base64.b64decode(item["thumbnail"]) if item.get("thumbnail") else None,
            )
            for item in body.get("neighbours") or ()
        )
        votes = body.get("knn_probabilities") or {}
        probabilities = {name: float(votes.get(name, 0.0)) for name in CLASS_NAMES}
        top = body.get("knn_top_class") or max(probabilities, key=probabilities.__getitem__)
        rows = body.get("index_rows")
        return cls(
            model_id=str(body["model_id"]),
            neighbours=neighbours,
            knn_probabilities=probabilities,
            knn_top_class=str(top),
            vote=str(body.get("vote") or "class-balanced"),
            accepted=bool((body.get("gate") or {}).get("accepted", True)),
            index_rows=int(rows) if rows is not None else None,
            model=ModelVersion.from_dict(body.get("model")),
        )


@dataclass(frozen=True)
class GradCamImage:
    """`POST /v1/gradcam` as a PNG plus the response headers that describe it."""

    png: bytes
    model_id: str
    target_class: str
    target_probability: float
    top_class: str
    mode: str
    opacity: float
    model: ModelVersion | None = None


class ServeClient:
    """Synchronous client of the DermaNet HTTP API (one short-lived connection pool)."""

    def __init__(
        self,
        base_url: str | None = None,
        timeout_s: float = 120.0,
        connect_timeout_s: float = 3.0,
        transport: httpx.BaseTransport | None = None,
        busy_budget_s: float = BUSY_BUDGET_S,
        sleep: Callable[[float], None] = time.sleep,
        api_key: str | None = None,
    ):
        """`api_key`: the account's key, sent as `Authorization: Bearer` on every request."""
        self.base_url = normalize_url(base_url) if base_url else default_serve_url()
        self.busy_budget_s = float(busy_budget_s)
        self._sleep = sleep
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- routes -------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._json(self._request("GET", "/healthz"))

    def models(self) -> ModelListing:
        body = self._json(self._request("GET", "/v1/models"))
        try:
            return ModelListing.from_json(body)
        except (KeyError, TypeError) as exc:
            raise ServeUnavailable(
                f"{self.base_url} answered /v1/models without a model listing ({exc}); "
                "is this a DermaNet server?"
            ) from None

    def classify(
        self, images: Sequence[tuple[str, bytes]], model: str | None = None
    ) -> list[Classification]:
        """Classify (name, bytes) pairs, in requests of at most 16 images (server batching)."""
        results: list[Classification] = []
        for start in range(0, len(images), MAX_FILES_PER_REQUEST):
            chunk = images[start : start + MAX_FILES_PER_REQUEST]
            files = [("file", (name, data)) for name, data in chunk]
            params = {"model": model} if model else {}
            body = self._json(self._request("POST", "/v1/classify", files=files, params=params))
            items = body.get("results", [body])
            results.extend(Classification.from_json(item) for item in items)
        return results

    def similar(self, name: str, data: bytes, model: str | None = None, k: int = 8) -> SimilarCases:
        """The k most similar confirmed cases of one image; a model without an index is a
        ServeError with status 404 whose message says how to build one."""
        params: dict[str, Any] = {"k": int(k)}
        if model:
            params["model"] = model
        response = self._request("POST", "/v1/similar", files={"file": (name, data)}, params=params)
        body = self._json(response)
        try:
            return SimilarCases.from_json(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise ServeUnavailable(
                f"{self.base_url} answered /v1/similar without similar cases ({exc})"
            ) from None

    def gradcam(
        self,
        name: str,
        data: bytes,
        model: str | None = None,
        target_class: str | None = None,
        mode: str = "overlay",
        opacity: float = 0.5,
    ) -> GradCamImage:
        params: dict[str, Any] = {"mode": mode, "opacity": f"{float(opacity):.3f}"}
        if model:
            params["model"] = model
        if target_class:
            params["target_class"] = target_class
        response = self._request("POST", "/v1/gradcam", files={"file": (name, data)}, params=params)
        headers = response.headers
        return GradCamImage(
            png=response.content,
            model_id=headers.get("x-dermanet-model", model or ""),
            target_class=headers.get("x-dermanet-target-class", target_class or ""),
            target_probability=float(headers.get("x-dermanet-target-probability", "nan")),
            top_class=headers.get("x-dermanet-top-class", ""),
            mode=mode,
            opacity=float(opacity),
            model=_header_version(headers),
        )

    # --- accounts, cases and audit (parsed by dermanet.ui.casebook) ----------------------------
    def me(self) -> dict[str, Any]:
        """`GET /v1/me`: the key's account, {"name", "role"}; NotSignedIn for a bad key."""
        return self._json(self._request("GET", "/v1/me"))

    def cases(self, patient: str = "", limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """`GET /v1/cases`: {"cases": [summary], "total"}, newest activity first; `patient`
        is a case-insensitive substring of the pseudonym."""
        params: dict[str, Any] = {"limit": int(limit), "offset": int(offset)}
        if patient.strip():
            params["patient"] = patient.strip()
        return self._json(self._request("GET", "/v1/cases", params=params))

    def create_case(self, patient: str, lesion: str, site: str | None = None) -> dict[str, Any]:
        """`POST /v1/cases`; the same patient and lesion twice is a 409 naming the case."""
        body = {"patient": patient, "lesion": lesion, "site": site or None}
        return self._json(self._request("POST", "/v1/cases", json=body))

    def case(self, case_id: str) -> dict[str, Any]:
        """`GET /v1/cases/{id}`: the summary, its images in time order with their stored
        answers, and its diagnoses; 404 when unknown or deleted."""
        return self._json(self._request("GET", f"/v1/cases/{_segment(case_id)}"))

    def delete_case(self, case_id: str) -> dict[str, Any]:
        return self._json(self._request("DELETE", f"/v1/cases/{_segment(case_id)}"))

    def add_image(
        self, case_id: str, name: str, data: bytes, taken_at: str | None = None
    ) -> dict[str, Any]:
        """`POST /v1/cases/{id}/images`: stored, classified and audited; the answer plus
        "image_id" and "case_id". `taken_at`: ISO 8601 date or datetime (default: now)."""
        form = {"taken_at": taken_at} if taken_at else None
        path = f"/v1/cases/{_segment(case_id)}/images"
        return self._json(self._request("POST", path, files={"file": (name, data)}, data=form))

    def image_file(self, case_id: str, image_id: str) -> bytes:
        path = f"/v1/cases/{_segment(case_id)}/images/{_segment(image_id)}/file"
        return self._request("GET", path).content

    def delete_image(self, case_id: str, image_id: str) -> dict[str, Any]:
        """Soft delete; only its uploader or an admin (403 otherwise, said by the server)."""
        path = f"/v1/cases/{_segment(case_id)}/images/{_segment(image_id)}"
        return self._json(self._request("DELETE", path))

    def add_diagnosis(
        self, case_id: str, label: str, method: str, note: str = ""
    ) -> dict[str, Any]:
        body = {"label": label, "method": method, "note": note}
        path = f"/v1/cases/{_segment(case_id)}/diagnosis"
        return self._json(self._request("POST", path, json=body))

    def audit(self, since: str | None = None, limit: int = 200) -> dict[str, Any]:
        """`GET /v1/audit` (admins only): {"events": [...]}, newest first; `since` is ISO
        8601 or a span such as "24h" or "7d"."""
        params: dict[str, Any] = {"limit": int(limit)} | ({"since": since} if since else {})
        return self._json(self._request("GET", "/v1/audit", params=params))

    # --- plumbing ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request; a 503 with Retry-After is retried after the advised delay (with a
        little jitter, so many clients do not return at once) while the busy budget lasts.
        Every DermaNet route is safe to repeat (classify and Grad-CAM change nothing)."""
        waited = 0.0
        attempts = 0
        while True:
            attempts += 1
            response = self._send(method, path, **kwargs)
            delay = _retry_after(response)
            if delay is None:
                break
            delay = min(max(delay, MIN_RETRY_S), MAX_RETRY_AFTER_S) * random.uniform(1.0, 1.25)
            if waited + delay > self.busy_budget_s:
                raise ServeBusy(
                    f"the DermaNet server at {self.base_url} is busy: it turned this request "
                    f"away {attempts} times over {waited:.0f} s ({_detail(response)}); "
                    "try again in a minute",
                    attempts=attempts,
                    waited_s=waited,
                )
            self._sleep(delay)
            waited += delay
        if response.status_code == 401:
            raise NotSignedIn(_detail(response), status=401)
        if response.status_code >= 400:
            raise ServeError(_detail(response), status=response.status_code)
        return response

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise ServeUnavailable(
                f"the DermaNet server at {self.base_url} did not answer in time; it may be "
                "starting or overloaded, try again in a moment"
            ) from None
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
            raise ServeUnavailable(
                f"cannot reach the DermaNet server at {self.base_url} ({reason}); {START_HINT}"
            ) from None

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            raise ServeUnavailable(
                f"{self.base_url} answered {response.request.url.path} with something other "
                "than JSON; is this a DermaNet server?"
            ) from None
        if not isinstance(body, dict):
            raise ServeUnavailable(f"{self.base_url} answered with unexpected JSON: {body!r:.200}")
        return body


def _header_version(headers: Mapping[str, str]) -> ModelVersion | None:
    """The Grad-CAM PNG's model version, from its X-DermaNet-Model* headers."""
    keys = {"id": "x-dermanet-model", "sha256": "x-dermanet-model-sha256",
            "created": "x-dermanet-model-created"}  # fmt: skip
    found = {key: headers.get(name) for key, name in keys.items()}
    return ModelVersion.from_dict(found) if all(found.values()) else None


def _segment(value: str) -> str:
    """An id as one URL path segment (ids come from the server, but never trust a slash)."""
    return quote(str(value), safe="")


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds to wait when the server says "busy, come back" (503/429 + Retry-After), else
    None; a 503 without Retry-After (e.g. a model that cannot load) is final."""
    if response.status_code not in (429, 503):
        return None
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None  # HTTP-date form or missing: not a retry advice we follow
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        detail = response.text[:300] or response.reason_phrase
    if not isinstance(detail, str):
        detail = str(detail)
    return f"the server refused the request ({response.status_code}): {detail}"
