"""ONNX export of a classifier and an ONNX Runtime engine for the Predictor (CPU inference).

On a CPU, ONNX Runtime runs DermResNetSE several times faster than torch eager (fused
conv + BN + activation, no Python per layer): benchmarks/inference_backends.py measures it.
The exported graph returns the logits AND the pooled features (the trust gate's OOD score
needs them) with a dynamic batch axis, and the last stage's feature map, which classify never
asks for (ONNX Runtime returns only the outputs requested) but Grad-CAM does: its gradient
then runs through the pooling and head alone in torch.

Exports are cached, never committed: one file per model content (a hash of the weights, the
model config, the input size and the exporter) under `$DERMANET_ONNX_CACHE`, else
`<temp dir>/dermanet-onnx/`, written atomically so replicas that export at the same time
never read a partial file. Grad-CAM's gradient stays on torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dermanet.inference.checkpoint import LoadedCheckpoint
from dermanet.storage import atomic_write

log = logging.getLogger(__name__)

ONNX_CACHE_ENV = "DERMANET_ONNX_CACHE"
EXPORT_VERSION = 2  # part of the cache key: bump when the exported graph changes
INPUT_NAME = "x"
OUTPUT_NAMES = ("logits", "features")  # what every served answer needs
FEATURE_MAP_NAME = "feature_map"  # the last stage's activations, for Grad-CAM only


class ServedOutputs(nn.Module):
    """The model as (logits, pooled features, last-stage feature map)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(x)
        return out.logits, out.features, out.feature_map


def export_onnx(model: nn.Module, img_size: int, path: str | Path) -> Path:
    """Export (logits, features, feature map) for float32 (batch, 3, S, S) input, any batch.

    The legacy (TorchScript) exporter: DermResNetSE has no data-dependent control flow, and it
    needs no onnxscript. Written atomically.
    """
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, int(img_size), int(img_size), device=device)
    buffer = io.BytesIO()
    outputs = [*OUTPUT_NAMES, FEATURE_MAP_NAME]
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *outputs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "legacy TorchScript-based exporter": chosen on purpose
        torch.onnx.export(
            ServedOutputs(model).eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=outputs,
            dynamic_axes=dynamic,
        )
    return atomic_write(path, buffer.getvalue())


def model_digest(checkpoint: LoadedCheckpoint) -> str:
    """Hash of what the exported graph depends on: weights, config, input size, exporter."""
    digest = hashlib.blake2b(digest_size=12)
    facts = {
        "config": checkpoint.config.to_dict(),
        "img_size": checkpoint.img_size,
        "torch": torch.__version__,
        "export_version": EXPORT_VERSION,
    }
    digest.update(json.dumps(facts, sort_keys=True, default=str).encode())
    for name, tensor in checkpoint.model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where exports are kept: $DERMANET_ONNX_CACHE, else a folder in the temp directory."""
    return Path(os.environ.get(ONNX_CACHE_ENV) or Path(tempfile.gettempdir()) / "dermanet-onnx")


def onnx_file(checkpoint: LoadedCheckpoint, folder: str | Path | None = None) -> Path:
    """The exported graph of this checkpoint's model: from the cache, else exported now."""
    path = Path(folder or cache_dir()) / f"{model_digest(checkpoint)}.onnx"
    if not path.is_file():
        export_onnx(checkpoint.model, checkpoint.img_size, path)
        log.info("exported the model to %s", path)
    return path


class OnnxEngine:
    """An ONNX Runtime session on the CPU; same call as the Predictor's torch engine.

    Intra-op threads default to torch's thread count, which Serve replicas set to the CPUs
    Ray gave them, so a half-CPU replica does not start a thread per core.
    """

    name = "onnx"

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        # ONNX Runtime's pool spin-waits after each call by default: on a few shared cores
        # (Serve's replicas, proxy and ingress) the spinning threads steal the CPU others need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @classmethod
    def for_checkpoint(
        cls,
        checkpoint: LoadedCheckpoint,
        threads: int | None = None,
        folder: str | Path | None = None,
    ) -> OnnxEngine:
        """Export (or reuse the cached export of) the checkpoint's model and open it; a cached
        file that does not open (another ONNX Runtime, a damaged disk) is exported again."""
        path = onnx_file(checkpoint, folder)
        try:
            return cls(path, threads)
        except Exception as exc:  # onnxruntime raises its own exception types
            log.warning("cached ONNX file %s does not open (%s); exporting it again", path, exc)
            export_onnx(checkpoint.model, checkpoint.img_size, path)
            return cls(path, threads)

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: _array(x)})
        return logits, features

    def with_feature_map(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(logits, features, last-stage feature map (N, C, h, w)) from the same call."""
        logits, features, feature_map = self.session.run(
            [*OUTPUT_NAMES, FEATURE_MAP_NAME], {INPUT_NAME: _array(x)}
        )
        return logits, features, feature_map


def _array(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
