"""Health that means something: a model is healthy when it loads and a tiny forward pass works.

`smoke_test` is the one check, used by the replicas' `check_health` (Serve restarts a replica
whose loaded model stops answering), by the replicas' loader (a model whose served path fails
is a load error, never a replica that fails health checks forever) and by `LoadChecks`, which
the ingress uses to mark a registry file that cannot be loaded as unusable in `/v1/models`
before any request needs it, and to describe each usable model's gate and prediction sets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dermanet.inference.checkpoint import load_checkpoint
from dermanet.inference.predictor import Predictor
from dermanet.inference.registry import ModelInfo
from dermanet.serving.trust_view import json_safe, model_trust

log = logging.getLogger("ray.serve")


class ModelCheckError(RuntimeError):
    """A model that loaded but whose served path does not give a valid answer."""


def smoke_test(predictor: Predictor) -> float:
    """The whole served path (quality checks, forward pass, OOD score, prediction set) on a
    flat grey image; raises ModelCheckError unless it gives finite probabilities that sum to 1
    and an answer JSON can carry. Returns the time it took (ms)."""
    started = time.perf_counter()
    side = predictor.img_size
    try:
        prediction = predictor.predict_batch([np.full((side, side, 3), 128, dtype=np.uint8)])[0]
        json.dumps(json_safe(prediction.to_dict()), allow_nan=False)
    except Exception as exc:  # e.g. trust statistics that do not fit the model: say which
        raise ModelCheckError(
            f"its served path fails ({type(exc).__name__}: {exc}); if the trust statistics "
            "are at fault, re-export it with jobs/evaluate.py --export"
        ) from exc
    probs = np.array(list(prediction.probabilities.values()))
    if not np.all(np.isfinite(probs)) or abs(probs.sum() - 1.0) > 1e-3:
        raise ModelCheckError(f"the model's forward pass gave no valid probabilities: {probs}")
    return (time.perf_counter() - started) * 1000


@dataclass(frozen=True)
class ModelCheck:
    """Outcome of loading one registry file: why it cannot be used, or its trust description."""

    error: str | None = None
    trust: dict[str, Any] = field(default_factory=dict)


def check_model_file(info: ModelInfo) -> ModelCheck:
    """Load the checkpoint and smoke-test it: the error (for people) or what its gate and
    prediction sets are (read from the model just loaded: no second read of the file)."""
    try:
        predictor = Predictor(load_checkpoint(info.path))
        smoke_test(predictor)
    except Exception as exc:  # whatever breaks, this file is not servable: say why
        log.warning("model %r fails to load: %s", info.model_id, exc)
        return ModelCheck(error=f"fails to load: {exc}")
    return ModelCheck(trust=model_trust(predictor))


class LoadChecks:
    """Each registry file is loaded once per version (size, mtime): its outcome is cached.

    Concurrent requests for an unchecked file share one check (a future per version), so a
    burst of requests never loads the same model many times.
    """

    def __init__(self) -> None:
        self._results: dict[tuple[str, int, str], asyncio.Future[ModelCheck]] = {}

    async def result(self, info: ModelInfo) -> ModelCheck:
        """The load check of this file version (metadata errors need no load)."""
        if info.error is not None:
            return ModelCheck(error=info.error)
        key = (info.model_id, info.size_bytes, info.modified_utc)
        future = self._results.get(key)
        if future is None:
            for old in [k for k in self._results if k[0] == info.model_id]:
                del self._results[old]  # a replaced file is checked again
            future = asyncio.ensure_future(asyncio.to_thread(check_model_file, info))
            self._results[key] = future
        return await asyncio.shield(future)

    async def error(self, info: ModelInfo) -> str | None:
        """Why this model cannot be used (metadata or load failure), or None."""
        return (await self.result(info)).error

    async def checked(self, info: ModelInfo) -> tuple[ModelInfo, dict[str, Any]]:
        """The listing entry with a load failure recorded as its `error` (usable=False), and
        its trust description (`gate`, `prediction_sets`; null when it cannot be used)."""
        check = await self.result(info)
        if check.error != info.error:
            info = replace(info, error=check.error)
        return info, dict(check.trust) or {"gate": None, "prediction_sets": None}
