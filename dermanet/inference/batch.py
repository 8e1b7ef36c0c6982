"""Batch inference on Ray Data: score a folder, a catalogue or a bucket, one row per image.

jobs/predict.py's logic. Files are listed in the driver, then read, decoded and prepared in CPU
tasks exactly as the server does before its model call (`Preprocessing`: a JPEG decoded at a
reduced DCT scale towards the model's size with the same pixel limit, colour constancy, one
resize, the gate's quality checks), and scored by an actor pool that holds a
`Predictor` (`map_batches` with a callable class, one GPU per actor when asked; the same
`backend` choice as Serve), so every row is what `/v1/classify` answers for that image:
probabilities, top class, risk, traffic light and the trust fields of `Prediction.to_dict()`,
plus the pooled features with `embeddings`.
Unreadable files become rows with an `error` and are logged, never fatal. The driver streams the
rows into one Parquet or CSV file (by suffix), written atomically when local.

This module needs Ray (the rest of `dermanet.inference` does not); import it explicitly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from dermanet.answer import ROW_COLUMNS, ModelVersion
from dermanet.data.images import IMAGE_EXTENSIONS, ImageDecodeError, image_id_from_filename
from dermanet.data.ray_io import dataset_from_frame
from dermanet.data.readers import read_catalogue
from dermanet.inference.checkpoint import LoadedCheckpoint, checkpoint_from_bytes
from dermanet.inference.predictor import (
    BACKENDS,
    Prediction,
    Predictor,
    PreparedImage,
    Preprocessing,
)
from dermanet.inference.registry import ModelRegistry, RegistryError
from dermanet.inference.risk import RiskPolicy
from dermanet.runtime import use_assigned_cpus
from dermanet.settings import check_settings, option
from dermanet.storage import exists, is_uri, read_bytes, resolve_filesystem
from dermanet.trust.quality import QualityReport

log = logging.getLogger(__name__)

OUTPUT_FORMATS = (".parquet", ".csv")
SERVER_MAX_PIXELS = 40_000_000  # ServeSettings.max_image_pixels: the same guard as the server
DECODE_BATCH = 16  # images decoded per call (bounds the memory of one output block)
PREPARED_COLUMNS = ("pixels", "quality")  # what the CPU tasks hand the model workers
PROGRESS_EVERY_S = 10.0


def model_option(files: str) -> Any:
    """The `--model` flag of the jobs that load one model (predict, build_index)."""
    return option(
        None,
        f"registry id (in --model-dir) or {files}; default: the registry's default model "
        "(weights/default.pt)",
        group="model",
    )


def model_dir_option() -> Any:
    """The `--model-dir` flag beside `model_option`."""
    return option(
        None,
        "registry folder for model ids; default $DERMANET_MODEL_DIR, else weights/",
        group="model",
    )


@dataclass(frozen=True)
class PredictSettings:
    """Everything jobs/predict.py accepts (its flags are generated from these fields)."""

    input: str = option(
        None,
        "required: images to score: a folder (searched recursively for .jpg/.jpeg/.png), one "
        "image, a catalogue CSV (any supported format; images looked up by id in --images) or "
        "a CSV with a `path` column; folders and `path` CSVs may be s3:// or gs:// URIs",
        group="data",
        metavar="DIR|CSV|URI",
    )
    images: str | None = option(
        None, "image folder of a catalogue CSV (default: the CSV's folder)", group="data"
    )
    output: str = option(
        None,
        "required: result table, .parquet or .csv (by suffix); a path or a URI",
        group="output",
    )
    overwrite: bool = option(False, "replace an existing --output", group="output")
    embeddings: bool = option(
        False, "also write each image's pooled feature vector (`embedding`)", group="output"
    )
    model: str | None = model_option("a checkpoint file / URI (.pt)")
    model_dir: str | None = model_dir_option()
    batch_size: int = option(32, "images per model call", group="run", minimum=1)
    num_workers: int = option(1, "model workers (the actor pool's size)", group="run", minimum=1)
    use_gpu: bool = option(False, "run each model worker on one GPU", group="run")
    backend: str = option(
        "auto",
        "the model call, as Serve's `backend`: auto = ONNX Runtime on a CPU worker, torch on a "
        "GPU; torch or onnx force one (onnx: CPU only)",
        group="run",
        choices=BACKENDS,
    )
    cpus_per_worker: float = option(
        1.0,
        "CPUs each model worker reserves; torch uses as many threads (at least 1)",
        group="run",
        minimum=0,
        exclusive=True,
    )
    threads_per_worker: int = option(
        0,
        "model threads in each worker (0: as many as the CPUs it reserves); more than its "
        "CPUs lets the model use the cores that reading and decoding leave idle (small "
        "machines), at the cost of some oversubscription while both run",
        group="run",
        minimum=0,
    )
    decode_cpus: float = option(
        1.0, "CPUs each read+decode task reserves", group="run", minimum=0, exclusive=True
    )
    max_image_pixels: int = option(
        SERVER_MAX_PIXELS, "larger images are listed as errors (the server's 413)", group="run",
        minimum=1,
    )  # fmt: skip

    def validate(self) -> None:
        check_settings(self)
        if not self.input or not self.output:
            raise ValueError("give --input and --output")
        if self.use_gpu and self.backend == "onnx":
            raise ValueError("--backend onnx runs on the CPU; use auto or torch with --use-gpu")
        if table_format(self.output) is None:
            raise ValueError(
                f"--output must end in {' or '.join(OUTPUT_FORMATS)} (the format follows the "
                f"suffix), got {self.output!r}"
            )


@dataclass(frozen=True)
class PredictOutcome:
    """What a run wrote: the table, how many rows, how many of them are errors, how fast."""

    output: str
    model_id: str
    images: int
    failed: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def table_format(location: str) -> str | None:
    """`.parquet` or `.csv` by the suffix of a path or URI (input CSVs and outputs), else None."""
    suffix = PurePosixPath(urlparse(location).path if is_uri(location) else location).suffix
    return suffix.lower() if suffix.lower() in OUTPUT_FORMATS else None


# ---------------------------------------------------------------- inputs


def list_image_files(location: str) -> list[str]:
    """Every .jpg/.jpeg/.png under a folder or URI (recursive, dot-files skipped), sorted."""
    filesystem, root = resolve_filesystem(location)
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [str(location)]
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"--input {location} does not exist")
    prefix = str(location).rstrip("/") if is_uri(location) else root.rstrip("/")
    found = [
        prefix + entry.path[len(root.rstrip("/")) :]
        for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        if entry.is_file
        and entry.base_name.lower().endswith(IMAGE_EXTENSIONS)
        and not entry.base_name.startswith(".")
    ]
    return sorted(found)


def input_rows(settings: PredictSettings) -> pd.DataFrame:
    """`image`, `path` (and `label` for a catalogue) of every image to score, in output order."""
    location = settings.input
    if table_format(location) == ".csv":
        return _csv_rows(location, settings.images)
    paths = list_image_files(location)
    if not paths:
        raise FileNotFoundError(
            f"no images ({'/'.join(IMAGE_EXTENSIONS)}) under {location} (searched recursively)"
        )
    return pd.DataFrame({"image": [image_id_from_filename(p) for p in paths], "path": paths})


def _csv_rows(location: str, images: str | None) -> pd.DataFrame:
    """A list of files in a `path` column (local or URI), or a local catalogue (labels kept)."""
    if not exists(location):
        raise FileNotFoundError(f"--input {location} does not exist")
    filesystem, path = resolve_filesystem(location)
    with filesystem.open_input_stream(path) as stream:
        table = pd.read_csv(stream, dtype=str)
    if "path" in [str(c).strip() for c in table.columns]:
        return _path_list(table, location)
    if is_uri(location):
        raise ValueError(
            f"--input {location}: a CSV from a URI needs a `path` column (the files to score); "
            "catalogue CSVs are read from local disk"
        )
    folder = images or str(Path(location).parent)
    catalogue = read_catalogue(location, folder, missing="drop")  # format from the header
    return catalogue.loc[:, ["image", "path", "label"]].reset_index(drop=True)


def _path_list(table: pd.DataFrame, csv_location: str) -> pd.DataFrame:
    """`path` values as given when absolute or URIs, else relative to the CSV's folder."""
    table.columns = [str(c).strip() for c in table.columns]
    paths = table["path"].dropna().astype(str).str.strip()
    if paths.empty:
        raise ValueError(f"{csv_location}: the `path` column is empty")
    base = csv_location.rsplit("/", 1)[0] if is_uri(csv_location) else Path(csv_location).parent
    resolved = [p if is_uri(p) or os.path.isabs(p) else f"{base}/{p}" for p in paths]
    if not is_uri(csv_location):
        resolved = [p if is_uri(p) else str(Path(p).resolve()) for p in resolved]
    ids = table.loc[paths.index, "image"] if "image" in table else None
    image = [
        str(i).strip() if ids is not None and pd.notna(i) else image_id_from_filename(p)
        for i, p in zip(ids if ids is not None else [None] * len(resolved), resolved, strict=True)
    ]
    return pd.DataFrame({"image": image, "path": resolved})


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint's bytes (shipped to the workers) and what the driver read from them."""

    model_id: str
    data: bytes
    mtime: float | None  # the file's, which dates a checkpoint that records no creation time
    loaded: LoadedCheckpoint

    @property
    def version(self) -> ModelVersion:
        assert self.loaded.version is not None  # set by checkpoint_from_bytes
        return self.loaded.version


def resolve_model(model: str | None, model_dir: str | None = None) -> ModelSource:
    """A registry id (or the registry default when None), a .pt file, or a .pt URI."""
    looks_like_file = model is not None and (
        is_uri(model) or model.endswith(".pt") or Path(model).is_file()
    )
    if looks_like_file:
        if not exists(model):
            raise FileNotFoundError(f"--model {model} does not exist")
        location = model
        model_id = PurePosixPath(urlparse(model).path if is_uri(model) else model).stem
    else:
        try:
            info = ModelRegistry(model_dir).resolve(model)
        except RegistryError as exc:
            raise ValueError(str(exc)) from None
        location, model_id = str(info.path), info.model_id
    fs, path = resolve_filesystem(location)
    modified = fs.get_file_info(path).mtime
    mtime = modified.timestamp() if modified is not None else None
    data = read_bytes(location)
    return ModelSource(model_id, data, mtime, checkpoint_from_bytes(data, model_id, mtime=mtime))


# ---------------------------------------------------------------- Ray Data stages


def read_error(exc: BaseException) -> str:
    if isinstance(exc, ImageDecodeError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "cannot read the file: it does not exist"
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"cannot read the file: {reason}"


def prepare_column(
    images: list[np.ndarray | None], preprocessing: Preprocessing
) -> tuple[list[bytes | None], list[str | None]]:
    """Each decoded image's model-size pixels and quality report (JSON), for a model worker:
    the server's preprocessing and gate checks, run in the CPU tasks so that the actors only
    run the model (None stays None: an unreadable file)."""
    pixels: list[bytes | None] = []
    qualities: list[str | None] = []
    for image in images:
        prepared = None if image is None else preprocessing.prepare(image)
        pixels.append(None if prepared is None else np.ascontiguousarray(prepared.pixels).tobytes())
        qualities.append(None if prepared is None else json.dumps(prepared.quality.to_dict()))
    return pixels, qualities


def prepared_image(
    pixels: bytes, quality: str, side: int, decoded: Callable[[], np.ndarray] | None = None
) -> PreparedImage:
    """`prepare_column`'s columns back into what `Predictor.predict_prepared` takes
    (`decoded`: how to decode the file again, for the gate's second look)."""
    image = np.frombuffer(pixels, dtype=np.uint8).reshape(side, side, 3)
    return PreparedImage(image, QualityReport(**json.loads(quality)), decoded)


def decode_rows(batch: pd.DataFrame, preprocessing: Preprocessing, max_pixels: int) -> pa.Table:
    """Read, decode and prepare files as the server does; failures become an `error`."""
    images: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for path in batch["path"]:
        try:
            images.append(preprocessing.decode(read_bytes(str(path)), max_pixels=max_pixels))
            errors.append(None)
        except (ImageDecodeError, OSError) as exc:
            images.append(None)
            errors.append(read_error(exc))  # logged by the driver, which sees every row
    pixels, qualities = prepare_column(images, preprocessing)
    table = pa.Table.from_pandas(batch.reset_index(drop=True), preserve_index=False)
    return (
        table.append_column("pixels", pa.array(pixels, pa.large_binary()))
        .append_column("quality", pa.array(qualities, pa.string()))
        .append_column("error", pa.array(errors, pa.string()))
    )


ARROW_TYPES = {"string": pa.string(), "float": pa.float64(), "bool": pa.bool_(),
               "strings": pa.list_(pa.string())}  # fmt: skip


def output_schema(passthrough: list[str], feature_dim: int | None) -> pa.Schema:
    """The result table's columns, fixed up front so every batch (and file) has the same:
    the input rows' own columns (text), then the answer's (`dermanet.answer.ROW_COLUMNS`)."""
    fields = [pa.field(name, pa.string()) for name in passthrough]
    fields += [pa.field(name, ARROW_TYPES[kind]) for name, kind in ROW_COLUMNS]
    if feature_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float32())))
    fields.append(pa.field("error", pa.string()))
    return pa.schema(fields)


def prediction_row(prediction: Prediction, embeddings: bool) -> dict[str, Any]:
    """What /v1/classify answers for the image, as flat columns (`Answer.to_row`)."""
    row = prediction.answer().to_row()
    if embeddings:
        row["embedding"] = np.asarray(prediction.features, dtype=np.float32).tolist()
    return row


class PredictWorker:
    """One model replica in Ray Data's actor pool: decoded pixels in, result rows out."""

    def __init__(
        self,
        model: Any,
        model_id: str,
        mtime: float | None,
        risk: dict[str, Any],
        schema: pa.Schema,
        use_gpu: bool,
        backend: str = "torch",
        views: str | None = None,
        threads: int = 0,
        max_pixels: int | None = None,
    ):
        import torch

        use_assigned_cpus(threads)
        data = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        if use_gpu and not torch.cuda.is_available():
            raise RuntimeError("--use-gpu: this worker got no usable CUDA device")
        device = "cuda" if use_gpu else "cpu"
        # the driver's bytes and mtime: the same model and the same version as the driver's
        loaded = checkpoint_from_bytes(data, model_id, device, mtime=mtime)
        if views is not None:  # e.g. "none" where only the plain view's features are wanted
            loaded.tta = views
        self.predictor = Predictor(loaded, RiskPolicy.from_mapping(risk), device, backend=backend)
        self.model_columns = loaded.version.to_columns()
        self.schema = schema
        self.embeddings = "embedding" in schema.names
        self.max_pixels = max_pixels  # rows with a `path` are decoded again for a second look

    def _decoder(self, path: str) -> Callable[[], np.ndarray]:
        """The file decoded again as `decode_rows` did: only the images the gate's first look
        refused are, so the decoded images need not travel with the pixels."""
        return lambda: self.predictor.decode(read_bytes(path), max_pixels=self.max_pixels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = batch.to_pydict()
        n = batch.num_rows
        rows: list[dict[str, Any]] = [{"error": columns["error"][i]} for i in range(n)]
        good = [i for i in range(n) if columns["error"][i] is None]
        side = self.predictor.img_size
        paths = columns.get("path") if self.max_pixels else None
        prepared = [
            prepared_image(columns["pixels"][i], columns["quality"][i], side,
                           None if paths is None else self._decoder(str(paths[i])))
            for i in good
        ]  # fmt: skip
        for i, outcome in zip(good, self._predict(prepared), strict=True):
            if isinstance(outcome, Prediction):
                rows[i] = prediction_row(outcome, self.embeddings) | {"error": None}
            else:
                rows[i] = {"error": outcome}
        passthrough = [name for name in self.schema.names if name in columns and name != "error"]
        for i, row in enumerate(rows):
            row.update({name: columns[name][i] for name in passthrough}, **self.model_columns)
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _predict(self, prepared: list[PreparedImage]) -> list[Prediction | str]:
        """One batched pass; if it fails, image by image so one bad image only loses itself."""
        try:
            return list(self.predictor.predict_prepared(prepared))
        except Exception:
            log.exception("batch prediction failed; retrying image by image")
        outcomes: list[Prediction | str] = []
        for item in prepared:
            try:
                outcomes.append(self.predictor.predict_prepared([item])[0])
            except Exception as exc:
                outcomes.append(f"prediction failed: {type(exc).__name__}: {exc}")
        return outcomes


def build_dataset(
    rows: pd.DataFrame, model: ModelSource, settings: PredictSettings, schema: pa.Schema
) -> ray.data.Dataset:
    """listing -> read + decode (CPU tasks) -> Predictor (actor pool) -> result rows, in order."""
    # One read+decode task per model batch: decoding and the model overlap batch by batch, and
    # every worker of the pool gets input (a worker receives whole blocks).
    source = dataset_from_frame(rows, rows_per_block=settings.batch_size)
    source.context.execution_options.preserve_order = True  # rows come out in listing order
    prepare_kwargs = {"max_pixels": settings.max_image_pixels}
    return prepare_and_score(
        source, decode_rows, prepare_kwargs, model, schema, settings, len(rows)
    )


def prepare_and_score(
    source: ray.data.Dataset,
    prepare: Callable[..., pa.Table],
    prepare_kwargs: dict[str, Any],
    model: ModelSource,
    schema: pa.Schema,
    run: PredictSettings,
    rows: int,
    *,
    views: str | None = None,
) -> ray.data.Dataset:
    """`prepare` (called with the model's `Preprocessing` and `prepare_kwargs`) in CPU tasks
    of `run.decode_cpus`, then a pool of `PredictWorker` actors (`run.num_workers`, fewer
    when `rows` fill fewer batches) taking `run.batch_size` rows: the stages of batch
    inference and of the similar-cases index. `views` overrides the checkpoint's served
    test-time views (None keeps them)."""
    workers = min(run.num_workers, max(1, math.ceil(rows / run.batch_size)))
    # Ray Data's per-operator CPU reservation would hold decode to ~1 task beside the workers on
    # a small machine (see dermanet.data.pipelines); the actor pool is sized by flags anyway.
    source.context.op_resource_reservation_enabled = False
    prepared = source.map_batches(
        prepare,
        # What the server does before its model call (decode, resize, colour constancy,
        # quality checks), here in CPU tasks without a model.
        fn_kwargs={"preprocessing": Preprocessing.for_checkpoint(model.loaded), **prepare_kwargs},
        batch_size=DECODE_BATCH,
        batch_format="pandas",
        num_cpus=run.decode_cpus,
        # Ray Data fuses a task map into the next actor map when their remote args match,
        # which would decode inside the model workers, one image after the other. Stating
        # Ray's default for CPU tasks (worker processes reused without limit) keeps decoding
        # in its own parallel CPU tasks.
        max_calls=0,
    )
    return prepared.map_batches(
        PredictWorker,
        fn_constructor_kwargs={
            "model": ray.put(model.data),
            "model_id": model.model_id,
            "mtime": model.mtime,
            "risk": RiskPolicy.from_env().to_dict(),
            "schema": schema,
            "use_gpu": run.use_gpu,
            "backend": run.backend,
            "views": views,
            "threads": run.threads_per_worker,
            "max_pixels": prepare_kwargs.get("max_pixels"),
        },
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=run.batch_size,
        batch_format="pyarrow",
        num_cpus=run.cpus_per_worker,
        num_gpus=1 if run.use_gpu else None,
    )


# ---------------------------------------------------------------- output


def check_output(location: str, overwrite: bool) -> None:
    """Refuse to replace results by accident (before any work is done)."""
    filesystem, path = resolve_filesystem(location)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        raise ValueError(f"--output {location} is a folder; give a .parquet or .csv file name")
    if exists(location) and not overwrite:
        raise FileExistsError(f"--output {location} already exists; pass --overwrite to replace it")


def _csv_ready(table: pa.Table) -> pa.Table:
    """CSV has no lists: list columns (reasons, sets, embeddings) become JSON text."""
    for index, field in enumerate(table.schema):
        if pa.types.is_list(field.type):
            text = [None if v is None else json.dumps(v) for v in table.column(index).to_pylist()]
            table = table.set_column(index, field.name, pa.array(text, pa.string()))
    return table


class TableWriter:
    """Streams tables into one Parquet or CSV file; a local file appears only when complete."""

    def __init__(self, location: str, schema: pa.Schema):
        self.location = location
        self.format = table_format(location)
        self.schema = schema
        self.filesystem, self.path = resolve_filesystem(location)
        self.temp: str | None = None
        if not is_uri(location):
            folder = Path(self.path).parent
            folder.mkdir(parents=True, exist_ok=True)
            fd, self.temp = tempfile.mkstemp(dir=folder, prefix=f".{Path(self.path).name}.",
                                             suffix=".tmp")  # fmt: skip
            os.close(fd)
        elif "/" in self.path:
            self.filesystem.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        self.sink = self.filesystem.open_output_stream(self.temp or self.path)
        if self.format == ".parquet":
            self.writer: Any = pq.ParquetWriter(self.sink, schema)
        else:
            self.writer = pacsv.CSVWriter(self.sink, _csv_ready(schema.empty_table()).schema)

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self.writer.write_table(table if self.format == ".parquet" else _csv_ready(table))

    def close(self, keep: bool) -> None:
        try:
            self.writer.close()
        finally:
            self.sink.close()
        if self.temp is None:
            return
        if keep:
            os.replace(self.temp, self.path)
        else:
            Path(self.temp).unlink(missing_ok=True)


def write_results(
    tables: Iterable[pa.Table], location: str, schema: pa.Schema, total: int
) -> tuple[int, int]:
    """Write every table; log unreadable images and progress; (rows, error rows)."""
    writer = TableWriter(location, schema)
    rows = failed = 0
    started = last = time.monotonic()
    try:
        for table in tables:
            if table.num_rows == 0:
                continue
            writer.write(table)
            errors = table.column("error").to_pylist()
            for path, error in zip(table.column("path").to_pylist(), errors, strict=True):
                if error is not None:
                    failed += 1
                    log.warning("unreadable image %s: %s", path, error)
            rows += table.num_rows
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                log.info("scored %d/%d images (%.1f images/s)", rows, total,
                         rows / (last - started))  # fmt: skip
    except BaseException:
        writer.close(keep=False)
        raise
    writer.close(keep=True)
    return rows, failed


# ---------------------------------------------------------------- the job


def check_resources(settings: PredictSettings, fixed_cluster: bool) -> None:
    """The actor pool plus one decode task must fit, or Ray Data waits forever."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    need_cpus = settings.num_workers * settings.cpus_per_worker + settings.decode_cpus
    need_gpus = settings.num_workers if settings.use_gpu else 0
    problems = []
    if need_cpus > cpus + 1e-9:
        problems.append(
            f"{settings.num_workers} workers x {settings.cpus_per_worker} CPU + "
            f"{settings.decode_cpus} CPU for decoding = {need_cpus:g} CPUs, but Ray has "
            f"{cpus:g}; lower --num-workers, --cpus-per-worker or --decode-cpus"
        )
    if need_gpus > gpus:
        problems.append(
            f"--use-gpu with {settings.num_workers} workers needs {need_gpus} GPUs, but Ray has "
            f"{gpus:g}"
        )
    if not problems:
        return
    if fixed_cluster:
        raise ValueError("; ".join(problems))
    log.warning("%s (waiting for the cluster to scale up)", "; ".join(problems))


def score_rows(
    rows: pd.DataFrame, model: ModelSource, settings: PredictSettings
) -> tuple[pa.Schema, Iterator[pa.Table]]:
    """The pipeline without the file: (schema, result tables in row order) for `rows` with at
    least `image` and `path`; the other columns of `rows` (a label, a lesion id) are carried
    into the results as text."""
    missing = {"image", "path"} - set(rows.columns)
    if missing:
        raise ValueError(f"rows to score need columns {sorted(missing)}")
    rows = rows.astype(object).where(rows.notna(), None).reset_index(drop=True)
    rows = rows.map(lambda v: v if v is None else str(v))
    reserved = set(output_schema([], 1).names) | set(PREPARED_COLUMNS)
    passthrough = [c for c in rows.columns if c not in reserved]
    feature_dim = model.loaded.config.feature_dim if settings.embeddings else None
    schema = output_schema(passthrough, feature_dim)
    dataset = build_dataset(rows.loc[:, passthrough], model, settings, schema)
    return schema, dataset.iter_batches(batch_size=None, batch_format="pyarrow")


def run_prediction(settings: PredictSettings, *, fixed_cluster: bool = True) -> PredictOutcome:
    """Score every image of `settings.input` into `settings.output` (Ray must be running).

    `fixed_cluster`: Ray cannot grow (a local Ray), so resources that do not fit are an error
    rather than a wait for an autoscaler.
    """
    settings.validate()
    check_output(settings.output, settings.overwrite)
    model = resolve_model(settings.model, settings.model_dir)
    rows = input_rows(settings)
    check_resources(settings, fixed_cluster)
    log.info(
        "scoring %d images from %s with model %r (%d worker(s), %s) -> %s",
        len(rows), settings.input, model.model_id, settings.num_workers,
        "GPU" if settings.use_gpu else "CPU", settings.output,
    )  # fmt: skip
    started = time.perf_counter()
    schema, tables = score_rows(rows, model, settings)
    written, failed = write_results(tables, settings.output, schema, len(rows))
    seconds = time.perf_counter() - started
    outcome = PredictOutcome(settings.output, model.model_id, written, failed, seconds)
    log.info(
        "wrote %d rows (%d unreadable) to %s in %.1f s (%.1f images/s)",
        written, failed, settings.output, seconds, outcome.images_per_s,
    )  # fmt: skip
    return outcome
