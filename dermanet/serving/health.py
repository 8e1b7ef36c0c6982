"""Health that means something: a model is healthy when it loads and a tiny forward pass works.

`smoke_test` is the one check, used by the replicas' `check_health` (Serve restarts a replica
whose loaded model stops answering) and by `LoadChecks`, which the ingress uses to mark a
registry file that cannot be loaded as unusable in `/v1/models` before any request needs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

import numpy as np

from dermanet.inference.checkpoint import load_checkpoint
from dermanet.inference.predictor import Predictor
from dermanet.inference.registry import ModelInfo

log = logging.getLogger("ray.serve")


class ModelCheckError(RuntimeError):
    """A model that loaded but does not produce a probability distribution."""


def smoke_test(predictor: Predictor) -> float:
    """One forward pass on a flat grey image; raises unless it gives finite probabilities
    that sum to 1. Returns the time it took (ms)."""
    started = time.perf_counter()
    side = predictor.img_size
    probs = predictor.probabilities([np.full((side, side, 3), 128, dtype=np.uint8)])
    if probs.shape[0] != 1 or not np.all(np.isfinite(probs)) or abs(probs.sum() - 1.0) > 1e-3:
        raise ModelCheckError(f"the model's forward pass gave no valid probabilities: {probs}")
    return (time.perf_counter() - started) * 1000


def check_model_file(info: ModelInfo) -> str | None:
    """None when the checkpoint loads and passes the smoke test, else why not (for people)."""
    try:
        smoke_test(Predictor(load_checkpoint(info.path)))
    except Exception as exc:  # whatever breaks, this file is not servable: say why
        log.warning("model %r fails to load: %s", info.model_id, exc)
        return f"fails to load: {exc}"
    return None


class LoadChecks:
    """Each registry file is loaded once per version (size, mtime): its outcome is cached.

    Concurrent requests for an unchecked file share one check (a future per version), so a
    burst of requests never loads the same model many times.
    """

    def __init__(self) -> None:
        self._results: dict[tuple[str, int, str], asyncio.Future[str | None]] = {}

    async def error(self, info: ModelInfo) -> str | None:
        """Why this model cannot be used (metadata or load failure), or None."""
        if info.error is not None:
            return info.error
        key = (info.model_id, info.size_bytes, info.modified_utc)
        future = self._results.get(key)
        if future is None:
            for old in [k for k in self._results if k[0] == info.model_id]:
                del self._results[old]  # a replaced file is checked again
            future = asyncio.ensure_future(asyncio.to_thread(check_model_file, info))
            self._results[key] = future
        return await asyncio.shield(future)

    async def checked(self, info: ModelInfo) -> ModelInfo:
        """The listing entry with a load failure recorded as its `error` (usable=False)."""
        error = await self.error(info)
        return info if error == info.error else replace(info, error=error)
