"""Build a model's similar-cases index from its training split (jobs/build_index.py's logic).

The features come from the batch-inference path (`dermanet.inference.batch.PredictWorker` in a
Ray Data actor pool: the served preprocessing and forward pass), so a query image uploaded to
`/v1/similar` and the indexed images are embedded the same way. Rows are taken from prepared
shards or a catalogue CSV + image folder (`dermanet.data.sources.split_rows`: the same split
every job sees); each keeps its image id, diagnosis and lesion id, and a small square JPEG
thumbnail cut from the same decoded image. Only training images go in: never the test split,
on which retrieval is measured (benchmarks/similar_cases.py). Unreadable images are logged
and left out, never fatal.

This module needs Ray (like `dermanet.inference.batch`); import it explicitly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import SPLITS
from dermanet.data.images import ImageDecodeError, encode_jpeg, shrink_image
from dermanet.data.pipelines import encoded_image
from dermanet.data.shards import shard_dir
from dermanet.data.sources import (
    DataLocation,
    DataSourceSettings,
    catalogue_rows,
    load_catalogue,
    split_rows,
)
from dermanet.inference.batch import (
    SERVER_MAX_PIXELS,
    ModelSource,
    PredictSettings,
    check_resources,
    model_dir_option,
    model_option,
    output_schema,
    prepare_and_score,
    prepare_column,
    resolve_model,
)
from dermanet.inference.predictor import Preprocessing
from dermanet.inference.registry import ModelRegistry, RegistryError
from dermanet.inference.similar import index_path, write_index
from dermanet.settings import check_settings, option
from dermanet.storage import is_uri, resolve_filesystem

log = logging.getLogger(__name__)

INDEX_SPLITS = ("train", "train+val")  # never test: retrieval is measured on it
THUMBNAIL_QUALITY = 80


@dataclass
class IndexSettings(DataSourceSettings):
    """Everything jobs/build_index.py accepts (its flags are generated from these fields)."""

    model: str | None = model_option("a checkpoint file (.pt)")
    model_dir: str | None = model_dir_option()
    split: str = option(
        "train",
        "which images become confirmed cases; never test (retrieval is measured on it)",
        group="data",
        choices=INDEX_SPLITS,
    )
    thumbnails: int = option(
        48, "side of the square JPEG thumbnail kept per image, px (0: none)", group="output",
        minimum=0, maximum=256,
    )  # fmt: skip
    output: str | None = option(
        None, "index file; default: <model id>.index.parquet beside the model", group="output"
    )
    batch_size: int = option(32, "images per model call", group="run", minimum=1)
    num_workers: int = option(1, "model workers (the actor pool's size)", group="run", minimum=1)
    cpus_per_worker: float = option(
        1.0, "CPUs each model worker reserves", group="run", minimum=0, exclusive=True
    )
    decode_cpus: float = option(
        1.0, "CPUs each read+decode task reserves", group="run", minimum=0, exclusive=True
    )

    def validate(self) -> None:
        check_settings(self)
        self.check_source()
        if self.output and not self.output.endswith(".index.parquet"):
            raise ValueError(f"--output must end in .index.parquet, got {self.output!r}")
        if self.model and is_uri(self.model):
            raise ValueError(
                "--model must be a local file or registry id: the index records the SHA-256 "
                "of the exact file and is stored beside it; copy the model here first"
            )

    @property
    def splits(self) -> list[str]:
        return self.split.split("+")

    def predict_settings(self) -> PredictSettings:
        """The batch-inference run settings these stand for (resource checks, the pipeline)."""
        return PredictSettings(
            input=self.shards or self.csv or "",
            output="index.parquet",
            model=self.model,
            model_dir=self.model_dir,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            cpus_per_worker=self.cpus_per_worker,
            decode_cpus=self.decode_cpus,
            backend="torch",
        )


@dataclass(frozen=True)
class IndexOutcome:
    """What a build wrote."""

    path: Path
    model_id: str
    rows: int
    failed: int
    size_bytes: int
    seconds: float


@dataclass
class EmbeddedSplit:
    """Images of some splits run through the served model: what each row is, and its output."""

    table: pd.DataFrame  # index, image, label, lesion_id (rows in `index` order)
    features: np.ndarray  # (N, D) float32, the pooled features
    probabilities: np.ndarray  # (N, K) the served (calibrated) softmax
    thumbnails: list[bytes | None] | None
    failed: list[tuple[str, str]]  # (image, why) of unreadable images

    @property
    def labels(self) -> np.ndarray:
        return np.array([CLASS_NAMES.index(c) for c in self.table["label"]], dtype=np.int64)


def model_file(model: str | None, model_dir: str | None = None) -> Path:
    """A local checkpoint file: the given path, or a registry id (None: the default)."""
    if model is not None and (model.endswith(".pt") or Path(model).is_file()):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--model {model} does not exist")
        return path.resolve()
    try:
        return ModelRegistry(model_dir).resolve(model).path
    except RegistryError as exc:
        raise ValueError(str(exc)) from None


def lesion_ids(location: DataLocation, splits: list[str]) -> pd.Series:
    """lesion_id by row `index` (the pipelines' row id) for some splits."""
    if location.shards:
        parts = []
        for split in splits:
            filesystem, path = resolve_filesystem(shard_dir(location.shards, split))
            parts.append(
                pq.read_table(path, columns=["index", "lesion_id"], filesystem=filesystem)
                .to_pandas()
            )  # fmt: skip
        table = pd.concat(parts, ignore_index=True)
    else:
        table = catalogue_rows(load_catalogue(location))
    return table.set_index("index")["lesion_id"].astype(str)


def thumbnail(image: np.ndarray, side: int) -> bytes:
    """The centre square of an image, shrunk to `side` px, as a small JPEG."""
    height, width = image.shape[:2]
    edge = min(height, width)
    top, left = (height - edge) // 2, (width - edge) // 2
    square = np.ascontiguousarray(image[top : top + edge, left : left + edge])
    return encode_jpeg(shrink_image(square, side, "short"), quality=THUMBNAIL_QUALITY)


def decode_batch(
    batch: pd.DataFrame, preprocessing: Preprocessing, max_pixels: int, thumbnail_px: int
) -> pa.Table:
    """Decode and prepare shard/file bytes as the server does (`/v1/similar`'s query takes the
    same path) into PredictWorker's input columns, plus a thumbnail from the same decoded
    pixels; failures become an `error`, not a crash."""
    images: list[np.ndarray | None] = []
    thumbs: list[bytes | None] = []
    errors: list[str | None] = []
    for row in range(len(batch)):
        try:
            image = preprocessing.decode(encoded_image(batch, row), max_pixels=max_pixels)
        except (ImageDecodeError, OSError) as exc:
            images.append(None)
            thumbs.append(None)
            errors.append(str(exc))
            continue
        images.append(image)
        thumbs.append(thumbnail(image, thumbnail_px) if thumbnail_px else None)
        errors.append(None)
    pixels, qualities = prepare_column(images, preprocessing)
    return pa.table(
        {
            "index": pa.array(batch["index"].to_numpy(), pa.int64()),
            "pixels": pa.array(pixels, pa.large_binary()),
            "quality": pa.array(qualities, pa.string()),
            "thumbnail": pa.array(thumbs, pa.binary()),
            "error": pa.array(errors, pa.string()),
        }
    )


def embed_split(
    location: DataLocation,
    splits: list[str],
    model: ModelSource,
    settings: IndexSettings,
    *,
    answers: bool = True,
) -> EmbeddedSplit:
    """Run the served model over some splits with Ray Data (Ray must be running).

    shard reads -> decode + prepare + thumbnail (CPU tasks) -> PredictWorker actor pool
    (`batch.prepare_and_score`, as jobs/predict.py). Without `answers` only the features are
    wanted: the plain view alone is run (the features are always the plain view's), and the
    probabilities are that view's, not the served views' average.
    """
    rows = split_rows(location, splits)
    lesions = lesion_ids(location, splits)
    feature_dim = model.loaded.config.feature_dim
    schema = output_schema([], feature_dim)
    schema = schema.append(pa.field("index", pa.int64())).append(pa.field("thumbnail", pa.binary()))
    source = rows.dataset.repartition(target_num_rows_per_block=settings.batch_size)
    prepare_kwargs = {"max_pixels": SERVER_MAX_PIXELS, "thumbnail_px": settings.thumbnails}
    run = settings.predict_settings()
    scored = prepare_and_score(source, decode_batch, prepare_kwargs, model, schema, run,
                               len(rows), views=None if answers else "none")  # fmt: skip
    wanted = ["index", "embedding", "thumbnail", "error", *(f"prob_{c}" for c in CLASS_NAMES)]
    parts = [
        batch.select(wanted)
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow")
        if batch.num_rows
    ]
    result = pa.concat_tables(parts).to_pandas() if parts else pd.DataFrame(columns=wanted)
    result = result.sort_values("index", kind="stable").reset_index(drop=True)
    what = rows.table.loc[result["index"].to_numpy()]
    images = what["image"].astype(str).to_numpy()
    bad = result["error"].notna().to_numpy()
    failed = [(img, err) for img, err in zip(images[bad], result["error"][bad], strict=True)]
    for image, error in failed:
        log.warning("left out unreadable image %s: %s", image, error)
    good = result.loc[~bad]
    what = what.loc[good["index"].to_numpy()]
    table = pd.DataFrame(
        {
            "index": good["index"].to_numpy(),
            "image": what["image"].astype(str).to_numpy(),
            "label": [CLASS_NAMES[i] for i in what["label_index"].to_numpy()],
            "lesion_id": lesions.reindex(good["index"].to_numpy()).fillna("").to_numpy(),
        }
    )
    table.loc[table["lesion_id"] == "", "lesion_id"] = table["image"]
    features = (
        np.stack(good["embedding"].to_numpy()).astype(np.float32)
        if len(good)
        else np.zeros((0, feature_dim), np.float32)
    )
    probabilities = good[[f"prob_{c}" for c in CLASS_NAMES]].to_numpy(dtype=np.float64)
    thumbs = good["thumbnail"].tolist() if settings.thumbnails else None
    return EmbeddedSplit(table, features, probabilities, thumbs, failed)


def build_index(settings: IndexSettings, *, fixed_cluster: bool = True) -> IndexOutcome:
    """Embed the training split and write `<model id>.index.parquet` (Ray must be running)."""
    settings.validate()
    if any(split not in SPLITS or split == "test" for split in settings.splits):
        raise ValueError(f"--split must be one of {INDEX_SPLITS}; the test split is never indexed")
    path = model_file(settings.model, settings.model_dir)
    model = resolve_model(str(path))
    output = Path(settings.output) if settings.output else index_path(path)
    check_resources(settings.predict_settings(), fixed_cluster)
    log.info(
        "indexing the %s split of %s with model %r -> %s",
        settings.split, settings.location.describe(), model.model_id, output,
    )  # fmt: skip
    started = time.perf_counter()
    embedded = embed_split(settings.location, settings.splits, model, settings, answers=False)
    if embedded.table.empty:
        raise ValueError(f"no readable images in the {settings.split} split; nothing to index")
    written = write_index(
        output,
        path,
        embedded.table,
        embedded.features,
        embedded.thumbnails,
        model_sha256=model.version.sha256,
        extra={
            "model_id": model.model_id,
            "split": settings.split,
            "data": settings.location.describe(),
            "thumbnail_px": settings.thumbnails,
            "left_out": len(embedded.failed),
        },
    )
    return IndexOutcome(
        path=written,
        model_id=model.model_id,
        rows=len(embedded.table),
        failed=len(embedded.failed),
        size_bytes=written.stat().st_size,
        seconds=time.perf_counter() - started,
    )
