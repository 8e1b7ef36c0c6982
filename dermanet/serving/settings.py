"""Serving settings: one typed object read from defaults, then env, then the Serve config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from dermanet.inference.predictor import BACKENDS
from dermanet.inference.registry import DEFAULT_MODEL_ENV, MODEL_DIR_ENV
from dermanet.inference.risk import RiskPolicy

ENV_PREFIX = "DERMANET_SERVE_"  # e.g. DERMANET_SERVE_MAX_BATCH_SIZE=32


@dataclass(frozen=True)
class ServeSettings:
    """Application settings; replicas, autoscaling and GPUs belong to the Serve config instead."""

    model_dir: str | None = None  # None: $DERMANET_MODEL_DIR, else weights/
    default_model: str | None = None  # None: $DERMANET_DEFAULT_MODEL, `default`, newest
    max_body_bytes: int = 20 * 1024 * 1024  # whole request body
    max_image_pixels: int = 40_000_000  # per decoded image: decompression-bomb guard
    max_files: int = 16  # images per classify request
    max_batch_size: int = 16  # @serve.batch size (1 turns batching off)
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    gradcam_max_side: int = 768  # rendered Grad-CAM PNGs are downscaled to this
    # Classifier model call: auto = ONNX Runtime on a CPU (the fastest there, see
    # docs/benchmarks.md), torch on a GPU; torch | onnx force one. Grad-CAM is always torch.
    backend: str = "auto"
    # Resilience (serve/config.yaml's `deployments:` section overrides the first five):
    classifier_replicas: int = 2  # >= 2: a dying replica is not the end of answers
    classifier_num_cpus: float = 0.5  # per replica; 2 x 0.5 fit a 2-core machine
    max_ongoing_requests: int = 0  # per Classifier replica, >= max_batch_size; 0: auto
    max_queued_requests: int = 32  # Classifier queue per caller; beyond it: 503 (-1: no limit)
    gradcam_max_queued_requests: int = 8  # Grad-CAM is slow: a short queue
    retry_after_s: float = 1.0  # the Retry-After advised with a 503 (whole seconds on the wire)
    # Admission at the ingress: classify/similar requests in progress beyond this are shed (503)
    # before the key check or the body; 0: the Classifiers' capacity (admission_capacity), -1:
    # no limit (shed only when the Classifier queue is full)
    admission_limit: int = 0
    shed_hold_s: float = 0.5  # a shed request's 503 waits this long (a timer, no CPU) first
    ready_timeout_s: float = 5.0  # /healthz/ready waits this long for a classifier probe
    risk: RiskPolicy = field(default_factory=RiskPolicy)
    # Cases, accounts and audit (None: $DERMANET_DATABASE_URL / $DERMANET_DATA_DIR, else an
    # SQLite file and the images in ./data):
    database_url: str | None = None
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.risk, Mapping):
            object.__setattr__(self, "risk", RiskPolicy.from_mapping(self.risk))
        positive = ("max_body_bytes", "max_image_pixels", "max_files", "max_batch_size")
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if 0 < self.max_ongoing_requests < self.max_batch_size or self.max_ongoing_requests < 0:
            bad.append(
                f"max_ongoing_requests={self.max_ongoing_requests} (0 for automatic, else >= "
                f"max_batch_size={self.max_batch_size}, or batches silently stay smaller)"
            )
        if self.batch_wait_timeout_s < 0:
            bad.append(f"batch_wait_timeout_s={self.batch_wait_timeout_s}")
        if self.classifier_replicas < 1 or self.classifier_num_cpus < 0:
            bad.append(
                f"classifier_replicas={self.classifier_replicas}, "
                f"classifier_num_cpus={self.classifier_num_cpus} (replicas >= 1, cpus >= 0)"
            )
        for name in ("max_queued_requests", "gradcam_max_queued_requests"):
            if getattr(self, name) < 1 and getattr(self, name) != -1:
                bad.append(f"{name}={getattr(self, name)} (-1 for no limit, else >= 1)")
        if self.admission_limit < -1:
            bad.append(f"admission_limit={self.admission_limit} (0: automatic, -1: no limit)")
        if not 0 <= self.shed_hold_s <= 10:
            bad.append(f"shed_hold_s={self.shed_hold_s} (0 to 10 s)")
        if self.retry_after_s < 0:
            bad.append(f"retry_after_s={self.retry_after_s} (>= 0)")
        if self.ready_timeout_s <= 0:
            bad.append(f"ready_timeout_s={self.ready_timeout_s} (> 0)")
        if self.gradcam_max_side < 16:
            bad.append(f"gradcam_max_side={self.gradcam_max_side} (needs >= 16)")
        if self.backend not in BACKENDS:
            bad.append(f"backend={self.backend!r} (one of {', '.join(BACKENDS)})")
        if bad:
            raise ValueError(f"invalid serving settings: {'; '.join(bad)}")

    @property
    def classifier_max_ongoing(self) -> int:
        """Requests a Classifier replica holds at once: two batches (one running, one filling)
        unless set; this, times the replicas, plus the queue bounds an accepted request's wait."""
        return self.max_ongoing_requests or max(32, 2 * self.max_batch_size)

    @property
    def admission_capacity(self) -> int | None:
        """Model requests the ingress admits at once (None: no limit): by default what the
        Classifiers hold (replicas x in progress) plus their queue, so an admitted request is
        rarely refused further in and a refused one costs no key check, body read or call."""
        if self.admission_limit:
            return None if self.admission_limit < 0 else self.admission_limit
        if self.max_queued_requests < 0:
            return None
        return self.classifier_replicas * self.classifier_max_ongoing + self.max_queued_requests

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["risk"] = self.risk.to_dict()
        return data

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None, base: ServeSettings | None = None):
        """Override `base` with a mapping (the `args:` of serve/config.yaml); unknown keys fail."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown serving settings {unknown}; valid: {sorted(known)}")
        if "risk" in data and isinstance(data["risk"], Mapping):
            data["risk"] = RiskPolicy.from_mapping(data["risk"])
        return replace(base or cls(), **data)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServeSettings:
        """Defaults overridden by DERMANET_SERVE_<FIELD>, the registry and risk variables."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {
            "model_dir": env.get(MODEL_DIR_ENV) or None,
            "default_model": env.get(DEFAULT_MODEL_ENV) or None,
            "risk": RiskPolicy.from_env(env),
        }
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or f.name == "risk":
                continue
            kind = type(getattr(cls(), f.name))
            try:
                values[f.name] = kind(raw) if kind in (int, float) else raw
            except ValueError:
                msg = f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a {kind.__name__}"
                raise ValueError(msg) from None
        return cls(**values)
