"""Batched prediction from a loaded checkpoint, with training's evaluation preprocessing.

The model call is pluggable (`backend`): torch (any device, Grad-CAM's too) or ONNX Runtime
(`dermanet.inference.onnx_backend`, the fastest on a CPU); both return the same logits and
pooled features, so the trust gate and the answers do not depend on the choice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dermanet.answer import Answer, ModelVersion, accept_all
from dermanet.classes import CLASS_INDEX, CLASS_NAMES, NUM_CLASSES
from dermanet.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from dermanet.data.transforms import decode_side, eval_pixels, pixels_to_tensor
from dermanet.inference.checkpoint import LoadedCheckpoint, load_checkpoint
from dermanet.inference.risk import RiskAssessment, RiskPolicy
from dermanet.inference.tta import tta_views
from dermanet.trust.cleaning import remove_artefacts
from dermanet.trust.conformal import prediction_sets
from dermanet.trust.evaluation import gate_decision, second_look_gate
from dermanet.trust.ood import ood_scores
from dermanet.trust.quality import QualityReport, QualityThresholds, assess_quality

log = logging.getLogger(__name__)


class UnknownClassError(ValueError):
    """A class name or index outside the class contract."""


def resolve_class(target: str | int) -> int:
    """Class name (case-insensitive) or index (also as a digit string) → index."""
    text = str(target).strip()
    if text.upper() in CLASS_INDEX:
        return CLASS_INDEX[text.upper()]
    if text.lstrip("-").isdigit() and 0 <= int(text) < NUM_CLASSES:
        return int(text)
    raise UnknownClassError(
        f"unknown class {target!r}; use a name from {list(CLASS_NAMES)} or an index 0.."
        f"{NUM_CLASSES - 1}"
    )


QUALITY_ONLY = "quality checks only: this model file has no OOD statistics"
# the decoded image, or how to decode it again (batch inference keeps only model-size pixels)
Decoded = np.ndarray | Callable[[], np.ndarray]


@dataclass(frozen=True)
class Prediction:
    """Per-class probabilities (CLASS_NAMES order), the top class, its risk assessment and the
    trust fields: the gate's verdict, the conformal prediction set and its coverage."""

    probabilities: dict[str, float]
    top_class: str
    top_probability: float
    risk: RiskAssessment
    gate: dict[str, Any] = field(default_factory=accept_all)
    prediction_set: list[str] | None = None
    set_coverage: float | None = None
    features: np.ndarray | None = field(default=None, compare=False, repr=False)
    model: ModelVersion | None = None  # the checkpoint file that answered

    @property
    def accepted(self) -> bool:
        return bool(self.gate["accepted"])

    def answer(self) -> Answer:
        """The answer schema shared by the HTTP API, batch inference and the dashboard; a
        refused image claims no risk (`Answer.without_risk`)."""
        answer = Answer(
            probabilities=dict(self.probabilities),
            top_class=self.top_class,
            top_probability=self.top_probability,
            **self.risk.to_dict(),
            gate=dict(self.gate),
            prediction_set=None if self.prediction_set is None else tuple(self.prediction_set),
            set_coverage=self.set_coverage,
            model=self.model,
        )
        return answer if self.accepted else answer.without_risk()

    def to_dict(self) -> dict[str, Any]:
        """The JSON of one `/v1/classify` result (`Answer.to_dict`)."""
        return self.answer().to_dict()


BACKENDS = ("auto", "torch", "onnx")  # auto: ONNX Runtime on a CPU, torch on a GPU


class Engine(Protocol):
    """What runs the model: float32 (N, 3, S, S) in, (logits (N, K), features (N, D)) out."""

    name: str

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]: ...


class TorchEngine:
    """The model called by torch (eager), optionally in channels-last memory format."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device, channels_last: bool = False):
        self.model = model
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = model.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = self.model(x.to(self.device).contiguous(memory_format=self.memory_format))
        return out.logits.float().cpu().numpy(), out.features.float().cpu().numpy()


class ViewAveragingEngine:
    """An engine served with test-time views (`LoadedCheckpoint.tta`): every view of a batch
    in one model call, logits averaged over the views (what `jobs/evaluate.py` scores), pooled
    features of the first, plain view (the gate and the similar-cases index judge the image
    as uploaded)."""

    def __init__(self, engine: Engine, mode: str):
        self.engine = engine
        self.mode = mode
        self.name = engine.name

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self._over_views(x, self.engine)  # type: ignore[return-value]

    def with_feature_map(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The answer as `__call__` gives it and the plain view's last-stage feature map, in
        one call of an engine that exports it (ONNX Runtime's: Grad-CAM's input)."""
        return self._over_views(x, self.engine.with_feature_map)  # type: ignore[attr-defined]

    def _over_views(self, x: torch.Tensor, call: Callable) -> tuple[np.ndarray, ...]:
        """`call` on every view in one batch: logits averaged, the other outputs' plain view."""
        views = tta_views(x, self.mode)
        logits, *plain_only = call(torch.cat(views))
        n = len(x)
        return logits.reshape(len(views), n, -1).mean(axis=0), *(out[:n] for out in plain_only)


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` → `onnx` on a CPU, `torch` on a GPU; unknown names and ONNX on a GPU fail."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; use one of {list(BACKENDS)}")
    if backend == "auto":
        return "onnx" if device.type == "cpu" else "torch"
    if backend == "onnx" and device.type != "cpu":
        raise ValueError(
            f"the onnx backend runs on the CPU (onnxruntime), not on {device}; use torch there"
        )
    return backend


def create_engine(checkpoint: LoadedCheckpoint, backend: str, device: torch.device) -> Engine:
    """The model call for a backend (ONNX: exported once per model content, then cached)."""
    if resolve_backend(backend, device) == "onnx":
        from dermanet.inference.onnx_backend import OnnxEngine  # onnxruntime only when asked

        return OnnxEngine.for_checkpoint(checkpoint)
    return TorchEngine(checkpoint.model, device)


@dataclass(frozen=True)
class PreparedImage:
    """An upload made ready for the model: its model-size pixels and its quality report."""

    pixels: np.ndarray  # uint8 (S, S, 3): `eval_pixels`, normalised on the batch tensor
    quality: QualityReport  # the gate's model-free checks, measured on the decoded image
    decoded: Decoded | None = None  # for the gate's second look; None: the first look decides


@dataclass(frozen=True)
class Preprocessing:
    """Everything between an upload's bytes and the model call, without the model.

    Small and picklable, so batch inference runs it in CPU tasks beside the model workers;
    the `Predictor` (serving, evaluation) runs the very same steps in process.
    """

    img_size: int
    color_constancy: str = "none"
    quality: QualityThresholds = field(default_factory=QualityThresholds)

    @classmethod
    def for_checkpoint(
        cls, checkpoint: LoadedCheckpoint, quality: QualityThresholds | None = None
    ) -> Preprocessing:
        """What a checkpoint's model expects (its input size and colour constancy)."""
        return cls(checkpoint.img_size, checkpoint.color_constancy, quality or QualityThresholds())

    @property
    def decode_side(self) -> int:
        """The short side uploads keep when decoded (`decode`): the model's input size, and
        never less than the quality checks measure on."""
        return max(decode_side(self.img_size), self.quality.analysis_size,
                   self.quality.min_short_side)  # fmt: skip

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode an upload for this model (JPEGs at a reduced DCT scale, see `decode_image`);
        raises ImageDecodeError on bad data."""
        return decode_image(data, max_pixels=max_pixels, min_short_side=self.decode_side)

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) → uint8 (S, S, 3): evaluation's preprocessing before normalising."""
        if not (
            isinstance(image, np.ndarray)
            and image.dtype == np.uint8
            and image.ndim == 3
            and image.shape[2] == 3
        ):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
            raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {got}")
        return eval_pixels(image, self.img_size, self.color_constancy)

    def assess(self, image: np.ndarray) -> QualityReport:
        """The gate's quality checks of one decoded image."""
        return assess_quality(image, self.quality)

    def prepare(self, image: np.ndarray) -> PreparedImage:
        """The model-size pixels and the quality report of one decoded image."""
        return PreparedImage(self.pixels(image), self.assess(image), image)


class Predictor:
    """A model in eval mode plus its exact preprocessing; thread-compatible for inference.

    Preprocessing (`decode`, `to_tensor`) is evaluation's (`eval_pixels`): JPEGs decode
    straight towards the model's size, one resize, normalisation on the batch tensor. The
    torch model stays available as `model` (Grad-CAM needs gradients) whatever the backend.
    """

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        risk_policy: RiskPolicy | None = None,
        device: str | torch.device = "cpu",
        quality: QualityThresholds | None = None,
        backend: str = "torch",
    ):
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.model = checkpoint.model.to(self.device).eval()
        self.risk_policy = risk_policy or RiskPolicy()
        self.preprocessing = Preprocessing.for_checkpoint(checkpoint, quality)
        engine = create_engine(checkpoint, backend, self.device)
        self.plain_engine: Engine = engine  # the plain view alone: the gate's second look
        if checkpoint.tta != "none":
            engine = ViewAveragingEngine(engine, checkpoint.tta)
        self.engine: Engine = engine

    @classmethod
    def from_path(
        cls, path: str | Path, risk_policy: RiskPolicy | None = None, backend: str = "torch"
    ) -> Predictor:
        return cls(load_checkpoint(path), risk_policy, backend=backend)

    @property
    def img_size(self) -> int:
        return self.checkpoint.img_size

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def decode_side(self) -> int:
        return self.preprocessing.decode_side

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return self.preprocessing.decode(data, max_pixels)

    def pixels(self, image: np.ndarray) -> np.ndarray:
        return self.preprocessing.pixels(image)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 (H, W, 3) → float32 (3, img_size, img_size), exactly as in evaluation."""
        return self.to_tensor([image])[0].numpy()

    def to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Preprocess RGB images into one normalised float32 (N, 3, S, S) tensor on the model's
        device."""
        return self._normalised([self.pixels(image) for image in images])

    def _normalised(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        return pixels_to_tensor(list(pixels), self.checkpoint.mean, self.checkpoint.std).to(
            self.device
        )

    def forward(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(raw logits (N, K), pooled features (N, D)), float32, from one forward pass."""
        if not images:
            dim = self.checkpoint.config.feature_dim
            return np.zeros((0, NUM_CLASSES), np.float32), np.zeros((0, dim), np.float32)
        return self.engine(self.to_tensor(images))

    def calibrated(self, logits: np.ndarray) -> np.ndarray:
        """softmax(logits / temperature), float64 for exact sums.

        The temperature was fitted on held-out data (1.0 when the file has none), so a served
        0.8 means right about 80% of the time on the data it was calibrated on.
        """
        z = torch.from_numpy(np.asarray(logits, dtype=np.float64)) / self.checkpoint.temperature
        return torch.softmax(z, dim=1).numpy()

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Calibrated softmax probabilities (N, NUM_CLASSES)."""
        return self.calibrated(self.forward(images)[0])

    @property
    def gate_description(self) -> str:
        """What the gate of this model checks (shown by /v1/models)."""
        ood = self.checkpoint.trust.get("ood")
        if not ood:
            return QUALITY_ONLY
        text = f"quality checks + OOD score ({ood.get('method', 'unknown')}, threshold " \
               f"{float(ood['threshold']):.4g})"  # fmt: skip
        if "second_look_threshold" in ood:
            text += f"; refused images again with hair and ink marks painted out (threshold " \
                    f"{float(ood['second_look_threshold']):.4g})"  # fmt: skip
        return text

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Predict a batch of RGB uint8 images in one forward pass, each through the gate.

        Quality checks run on the decoded image; the OOD score and the prediction set come
        from the same forward pass (statistics stored in the checkpoint at export).
        """
        return self.predict_prepared([self.preprocessing.prepare(image) for image in images])

    def predict_prepared(self, prepared: Sequence[PreparedImage]) -> list[Prediction]:
        """`predict_batch` for images whose preprocessing already ran (batch inference runs
        `Preprocessing.prepare` in CPU tasks): one forward pass, then the gate."""
        if not prepared:
            return []
        logits, features = self.engine(self._normalised([p.pixels for p in prepared]))
        return self.predictions(
            [p.quality for p in prepared], logits, features, [p.decoded for p in prepared]
        )

    def assess(self, image: np.ndarray) -> QualityReport:
        """The gate's quality checks of one decoded image."""
        return self.preprocessing.assess(image)

    def predictions(
        self,
        qualities: Sequence[QualityReport],
        logits: np.ndarray,
        features: np.ndarray,
        decoded: Sequence[Decoded | None] | None = None,
    ) -> list[Prediction]:
        """The answers (probabilities, risk, gate, prediction set) for images whose forward
        pass has already run (`forward`, or Grad-CAM's own forward and backward) and whose
        quality checks (`assess`) are done. With the `decoded` images, the gate's second look
        (`second_look`) runs on those the OOD score alone refused."""
        probs = self.calibrated(logits)
        ood_stats = self.checkpoint.trust.get("ood")
        sets_stats = self.checkpoint.trust.get("conformal")
        scores = ood_scores(ood_stats, features, logits) if ood_stats else [None] * len(probs)
        threshold = float(ood_stats["threshold"]) if ood_stats else None
        sets = prediction_sets(probs, sets_stats) if sets_stats else [None] * len(probs)
        coverage = float(sets_stats["coverage"]) if sets_stats else None
        predictions = []
        for quality, p, f, score, members in zip(qualities, probs, features, scores, sets,
                                                  strict=True):  # fmt: skip
            gate = gate_decision(quality, score, threshold)
            if not ood_stats:
                gate["checks"] = QUALITY_ONLY
            predictions.append(
                self.prediction_from_probabilities(
                    p,
                    gate=gate,
                    prediction_set=None if members is None else [CLASS_NAMES[i] for i in members],
                    set_coverage=coverage,
                    features=f,
                )
            )
        if decoded is not None:
            return self.second_look(predictions, qualities, decoded)
        return predictions

    def second_look(
        self,
        predictions: Sequence[Prediction],
        qualities: Sequence[QualityReport],
        decoded: Sequence[Decoded | None],
    ) -> list[Prediction]:
        """Images that passed the quality checks but were refused on their OOD score, scored
        again with hair and ink marks painted out (`dermanet.trust.cleaning`, one more forward
        pass for those alone); accepted if the cleaned image is within the model's
        `second_look_threshold`. The probabilities, set and features stay the image's own."""
        stats = self.checkpoint.trust.get("ood") or {}
        threshold = stats.get("second_look_threshold")
        out = list(predictions)
        if threshold is None:  # statistics fitted without a second look
            return out
        chosen = [
            i
            for i, (p, quality, image) in enumerate(zip(out, qualities, decoded, strict=True))
            if image is not None and quality.ok and not p.accepted
            and p.gate.get("ood_score") is not None
        ]  # fmt: skip
        images = {i: _decoded_image(decoded[i]) for i in chosen}  # type: ignore[arg-type]
        chosen = [i for i in chosen if images[i] is not None]
        if not chosen:
            return out
        scores = self.cleaned_ood_scores([images[i] for i in chosen])
        for i, score in zip(chosen, scores, strict=True):
            out[i] = replace(out[i], gate=second_look_gate(out[i].gate, float(score), threshold))
        return out

    def cleaned_forward(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(logits, features) of decoded images with their hair and ink marks painted out
        (`remove_artefacts`), for the second look and the benchmark that fits its own
        statistics. The plain view alone is run: the score is on its features (and, for a
        method that reads logits, on its logits), so the served views would only cost time."""
        return self.plain_engine(self.to_tensor([remove_artefacts(image) for image in images]))

    def cleaned_ood_scores(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """The second look's OOD scores of decoded images (`cleaned_forward`), against the
        model's own statistics; reports that judge it call this too."""
        logits, features = self.cleaned_forward(images)
        return ood_scores(self.checkpoint.trust["ood"], features, logits)

    def predict(self, image: np.ndarray) -> Prediction:
        return self.predict_batch([image])[0]

    def predict_bytes(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Prediction:
        """Decode (any mode, size-limited) and predict; raises ImageDecodeError on bad data."""
        return self.predict(self.decode(data, max_pixels=max_pixels))

    def prediction_from_probabilities(self, probs: np.ndarray, **trust: Any) -> Prediction:
        values = {name: float(p) for name, p in zip(CLASS_NAMES, probs, strict=True)}
        top = int(np.argmax(probs))
        return Prediction(
            probabilities=values,
            top_class=CLASS_NAMES[top],
            top_probability=values[CLASS_NAMES[top]],
            risk=self.risk_policy.assess(values),
            model=self.checkpoint.version,
            **trust,
        )


def _decoded_image(decoded: Decoded) -> np.ndarray | None:
    """The decoded image; None when decoding it again failed (a file gone or unreadable since
    the first look): then the first look's verdict stands, logged, rather than an error."""
    if not callable(decoded):
        return decoded
    try:
        return decoded()
    except (ImageDecodeError, OSError) as exc:
        log.warning("second look skipped: the image could not be decoded again (%s)", exc)
        return None
