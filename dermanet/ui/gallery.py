"""Dashboard state that outlives one Streamlit rerun: selection, answers, similar cases and
Grad-CAM renders.

One `DashboardState` lives in `st.session_state`; it knows nothing about Streamlit, so the
rules (what is selected after an upload or a removal, which images still need a prediction
for the chosen checkpoint) are plain Python and tested as such.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dermanet.ui.client import (
    Classification,
    GradCamImage,
    NotSignedIn,
    ServeClient,
    ServeError,
    SimilarCases,
)
from dermanet.ui.storage import StoredImage, UploadRejected, UploadStore

# (image, model, target class or "" for the predicted one, mode, opacity)
GradCamKey = tuple[str, str, str, str, float]


def _page_level(exc: ServeError) -> bool:
    """A failure of the whole page, not of one image: no answer (busy, unreachable) or the
    key refused (401: the page signs out). Not remembered as the image's error."""
    return exc.status is None or isinstance(exc, NotSignedIn)


@dataclass
class UploadOutcome:
    """What one batch of uploads did: images kept (new or already there) and refusals."""

    stored: list[StoredImage] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


@dataclass
class DashboardState:
    """Selection, predictions and similar cases per (image, model), a small Grad-CAM cache."""

    selected: str | None = None
    seen_uploads: set[str] = field(default_factory=set)
    uploader_round: int = 0
    flash: list[str] = field(default_factory=list)  # messages for the next run (after a rerun)
    predictions: dict[tuple[str, str], Classification] = field(default_factory=dict)
    errors: dict[tuple[str, str], str] = field(default_factory=dict)
    gradcams: OrderedDict[GradCamKey, GradCamImage] = field(default_factory=OrderedDict)
    max_gradcams: int = 24
    similar: dict[tuple[str, str], SimilarCases] = field(default_factory=dict)
    similar_errors: dict[tuple[str, str], str] = field(default_factory=dict)

    # --- uploads and selection -----------------------------------------------------------------
    def add_uploads(
        self, store: UploadStore, files: Iterable[tuple[str, str, bytes]]
    ) -> UploadOutcome:
        """Keep new uploader files (file_id, name, bytes) once each; select the last kept one."""
        outcome = UploadOutcome()
        for file_id, name, data in files:
            if file_id in self.seen_uploads:
                continue
            self.seen_uploads.add(file_id)
            try:
                outcome.stored.append(store.save(name, data))
            except UploadRejected as exc:
                outcome.rejected.append(str(exc))
        if outcome.stored:
            self.selected = outcome.stored[-1].image_id
        return outcome

    def select(self, image_id: str) -> None:
        self.selected = image_id

    def current(self, images: Sequence[StoredImage]) -> StoredImage | None:
        """The selected image; the newest one when nothing (or a removed image) was selected."""
        by_id = {image.image_id: image for image in images}
        if self.selected not in by_id:
            self.selected = images[0].image_id if images else None
        return by_id.get(self.selected) if self.selected else None

    def remove(self, store: UploadStore, image_id: str) -> None:
        """Delete the image and everything remembered about it."""
        store.remove(image_id)
        if self.selected == image_id:
            self.selected = None
        for cache in (self.predictions, self.errors, self.similar, self.similar_errors):
            for key in [k for k in cache if k[0] == image_id]:
                del cache[key]
        for key in [k for k in self.gradcams if k[0] == image_id]:
            del self.gradcams[key]

    # --- predictions ---------------------------------------------------------------------------
    def prediction(self, image_id: str, model_id: str) -> Classification | None:
        return self.predictions.get((image_id, model_id))

    def error(self, image_id: str, model_id: str) -> str | None:
        return self.errors.get((image_id, model_id))

    def classify_missing(
        self, client: ServeClient, store: UploadStore, images: Sequence[StoredImage], model_id: str
    ) -> int:
        """Classify every image without an answer from `model_id` (batched); returns how many.

        A request that fails as a whole (e.g. one unreadable image among several) is retried
        image by image, so one bad file cannot hide the others' answers.
        ServeUnavailable and NotSignedIn propagate: the page shows one clear message instead.
        """
        todo = [
            image
            for image in images
            if (image.image_id, model_id) not in self.predictions
            and (image.image_id, model_id) not in self.errors
        ]
        if not todo:
            return 0
        payload = [(image.original_name, store.read(image.image_id)) for image in todo]
        try:
            answers = client.classify(payload, model=model_id)
        except ServeError as exc:
            if _page_level(exc) or len(todo) == 1:
                if _page_level(exc):
                    raise
                self.errors[(todo[0].image_id, model_id)] = str(exc)
                return 1
            for image, item in zip(todo, payload, strict=True):
                try:
                    self.predictions[(image.image_id, model_id)] = client.classify(
                        [item], model=model_id
                    )[0]
                except ServeError as single:
                    if _page_level(single):
                        raise
                    self.errors[(image.image_id, model_id)] = str(single)
            return len(todo)
        for image, answer in zip(todo, answers, strict=True):
            self.predictions[(image.image_id, model_id)] = answer
        return len(todo)

    # --- similar cases -------------------------------------------------------------------------
    def similar_cases(
        self, client: ServeClient, store: UploadStore, image: StoredImage, model_id: str, k: int = 8
    ) -> SimilarCases | None:
        """The server's nearest confirmed cases, asked once per (image, model); None when it
        refused (e.g. 404: the model has no index; `similar_error` says why, remembered).
        ServeUnavailable (no answer, busy) propagates and is not remembered: asked again on
        the next run."""
        key = (image.image_id, model_id)
        if key in self.similar:
            return self.similar[key]
        if key in self.similar_errors:
            return None
        try:
            cases = client.similar(image.original_name, store.read(image.image_id), model_id, k)
        except ServeError as exc:
            if _page_level(exc):
                raise
            self.similar_errors[key] = str(exc)
            return None
        self.similar[key] = cases
        return cases

    def similar_error(self, image_id: str, model_id: str) -> str | None:
        return self.similar_errors.get((image_id, model_id))

    # --- Grad-CAM ------------------------------------------------------------------------------
    def gradcam(
        self,
        client: ServeClient,
        store: UploadStore,
        image: StoredImage,
        model_id: str,
        target: str | None,
        mode: str,
        opacity: float,
    ) -> GradCamImage:
        """The server's render, cached per (image, model, class, mode, opacity)."""
        key: GradCamKey = (image.image_id, model_id, target or "", mode, round(float(opacity), 3))
        if key in self.gradcams:
            self.gradcams.move_to_end(key)
            return self.gradcams[key]
        result = client.gradcam(
            image.original_name,
            store.read(image.image_id),
            model=model_id,
            target_class=target,
            mode=mode,
            opacity=opacity,
        )
        self.gradcams[key] = result
        while len(self.gradcams) > self.max_gradcams:
            self.gradcams.popitem(last=False)
        return result
