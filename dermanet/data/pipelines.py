"""Ray Data pipelines that stream images into training and evaluation.

Every source becomes rows that say where an image is (`jpeg` bytes, a shard `file` and `row`,
or a file `path`: see `encoded_image`), with `label_index` and `index` (a stable row id, used to
name offending samples in NaN dumps); `decode_transform_batch` reads and decodes them into the
batch contract the training modules consume:

    labelled:  {"image": uint8 (N, 3, S, S), "label": int64 (N,), "index": int64 (N,)}
    two-view:  {"view1": uint8 (N, 3, S, S), "view2": ..., "index": int64 (N,)}

Images stay uint8 through Ray's object store (4x fewer bytes than float32);
`NormalizedBatches` turns them into normalised float32 on the training device.

Sources: Parquet shards (`read_shards`), a catalogue of raw files (`read_catalogue_files`) and
unlabelled image folders (`read_image_folders`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data import RandomSeedConfig
from ray.data.dataset import MaterializedDataset
from ray.data.expressions import random

from dermanet.data.catalogue import SPLITS
from dermanet.data.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    decode_image_fast,
)
from dermanet.data.ray_io import dataset_from_frame
from dermanet.data.shards import shard_dir, shard_image
from dermanet.data.transforms import (
    DERM_MEAN,
    DERM_STD,
    byol_transform,
    decode_side,
    eval_pixels,
    normalize_images,
    to_uint8_chw,
    train_transform,
)
from dermanet.storage import read_bytes, resolve_filesystem

log = logging.getLogger(__name__)

Mode = Literal["train", "eval", "two_view"]
# Reading bytes is I/O: a quarter CPU each, so reads never wait for a whole free CPU while
# training workers and Serve replicas hold the rest (a full-CPU request can hang forever).
IO_CPUS = 0.25
# What a shard row streams as: where its bytes are, and the pipeline's row contract.
SHARD_REFERENCE_COLUMNS = ("file", "row", "label_index", "index")


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs that size the pipeline to the machine: one 2-core laptop or a GPU node.

    `rows_per_block` is 512 because every decode task leaves its worker idle about 20 ms in
    Ray Data's dispatch and hand-off, beside 0.6 ms of decoding per image at 128 px: 512-row
    blocks halve that idle, so an epoch streams faster once started (5 of 6 paired runs
    against 256 rows, -4 % to +15 %), for a first batch 0.2-0.5 s later each epoch
    (docs/benchmarks.md). An epoch that streams for minutes gains; a 3 s benchmark pass is
    about even.
    """

    img_size: int = 128
    batch_size: int = 32  # rows per map_batches call (not the training batch)
    rows_per_block: int = 512  # decode work is cut into blocks of this many rows (see above)
    num_cpus: float = 1.0  # CPUs each decode/augment task reserves
    concurrency: int | None = None  # max parallel decode tasks; None lets Ray Data decide
    reserve_per_operator: bool = False  # Ray Data's per-operator CPU reservation (see below)
    progress_bars: bool = False  # Ray Data's own bars and banners (training prints its own)
    color_constancy: str = "none"  # preprocessing the model was trained with (checkpoint)
    camera_p: float = 0.0  # training only: camera/pipeline augmentation probability
    mean: tuple[float, ...] = DERM_MEAN
    std: tuple[float, ...] = DERM_STD


def read_shards(
    output: str,
    split: str,
    keep_index: set[int] | None = None,
    rows_per_block: int = PipelineConfig.rows_per_block,
) -> ray.data.Dataset:
    """One split of prepared shards as light rows: `file`, `row` (the image's position in that
    file), `label_index`, `index`; the task that decodes a row fetches its bytes
    (`encoded_image`). `keep_index` keeps only those rows (an origin filter, see
    `dermanet.data.sources`); `rows_per_block` sizes the decode tasks (a pipeline built with
    the same value in its `PipelineConfig` leaves the blocks as they are).

    References rather than bytes, because training reshuffles its block order every epoch, an
    all-to-all step that waits for every upstream block: with the encoded images in the rows,
    every shard was read before the first image was decoded (first batch after 12-18 s, 0.45x
    a DataLoader over an epoch; docs/benchmarks.md). References shuffle for free and reading
    overlaps decoding, as for raw files.
    """
    return shard_references_dataset(shard_rows(output, split), keep_index, rows_per_block)


def shard_rows(output: str, split: str, columns: Sequence[str] = ()) -> pd.DataFrame:
    """One split's shard rows without the image bytes, read in the driver: `file`, `row`,
    `label_index`, `index`, and those of `columns` (e.g. `image`, `origin`) the shards have.

    Read here rather than with Ray's `read_parquet`: it lists files in a task that needs a
    whole free CPU, which on a small machine can wait forever beside training workers and
    Serve replicas.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = list_parquet_files(shard_dir(output, split))
    if not files:
        raise FileNotFoundError(
            f"no Parquet files for split {split!r} under {shard_dir(output, split)}; "
            "run jobs/prepare_data.py first"
        )
    if columns:  # one schema for the split: prepare_shards writes every file alike
        filesystem, first = resolve_filesystem(files[0])
        present = set(pq.read_schema(first, filesystem=filesystem).names)
        columns = [c for c in columns if c in present]
    wanted = ["label_index", "index", *columns]
    return pd.concat([_shard_file_rows(file, wanted) for file in files], ignore_index=True)


def shard_references_dataset(
    rows: pd.DataFrame,
    keep_index: set[int] | None = None,
    rows_per_block: int = PipelineConfig.rows_per_block,
) -> ray.data.Dataset:
    """Ray Data rows (`file`, `row`, `label_index`, `index`) of `shard_rows`' table."""
    rows = rows.loc[:, list(SHARD_REFERENCE_COLUMNS)]
    if keep_index is not None:
        rows = rows.loc[rows["index"].isin(keep_index)]
    return dataset_from_frame(rows, rows_per_block=rows_per_block)


def _shard_file_rows(file: str, columns: Sequence[str]) -> pd.DataFrame:
    filesystem, path = resolve_filesystem(file)
    rows = pq.read_table(path, columns=list(columns), filesystem=filesystem).to_pandas()
    rows.insert(0, "row", np.arange(len(rows), dtype=np.int64))
    rows.insert(0, "file", file)
    return rows.astype({"file": object})


def list_parquet_files(location: str) -> list[str]:
    """Sorted `*.parquet` files under a folder or URI (sorted: evaluation order is stable)."""
    filesystem, path = resolve_filesystem(location)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return []
    prefix = location.rstrip("/")
    return sorted(
        prefix + info.path[len(path.rstrip("/")) :]
        for info in infos
        if info.is_file and info.path.endswith(".parquet")
    )


def read_catalogue_files(table: pd.DataFrame) -> ray.data.Dataset:
    """Rows from raw image files (quick start, no prepare step): paths only; each decode task
    reads its own files (`decode_transform_batch`), as a DataLoader worker does.

    A separate quarter-CPU read operator let up to four reads per CPU crowd out decoding on a
    small machine (0.15-0.24x a DataLoader, docs/benchmarks.md); reading inside the decode task
    scales with the decode tasks instead. `table` has `path`, `label_index` and `index` (see
    `dermanet.data.sources.split_rows`).
    """
    table = table.loc[:, ["path", "label_index", "index"]].astype({"path": object})
    return dataset_from_frame(table, rows_per_block=PipelineConfig.rows_per_block)


def read_image_folders(folders: list[str]) -> ray.data.Dataset:
    """Unlabelled images under one or more folders (recursive), for BYOL; label_index = -1."""
    ds = ray.data.read_binary_files(
        folders, include_paths=True, file_extensions=[e.lstrip(".") for e in IMAGE_EXTENSIONS]
    )
    return ds.map_batches(_binary_to_rows, batch_format="pandas", num_cpus=IO_CPUS)


def encoded_image(batch: Mapping[str, Any] | pd.DataFrame, row: int) -> bytes:
    """The encoded image of a batch's `row`-th row (numpy or pandas batch): its `jpeg` bytes
    (image folders), the shard row it refers to (`file`, `row`: shards), or the file at its
    `path` (catalogue sources), read by the task that decodes it; OSError when unreadable."""

    def cell(name: str) -> Any:
        column = batch[name]
        return column.iloc[row] if isinstance(column, pd.Series) else column[row]  # by position

    if "jpeg" in batch:
        return bytes(cell("jpeg"))
    if "file" in batch:
        return shard_image(str(cell("file")), int(cell("row")))
    return read_bytes(str(cell("path")))


def _binary_to_rows(batch: pd.DataFrame) -> pd.DataFrame:
    # Stable ids from the path, so the same file gets the same index in every run.
    index = [int.from_bytes(_digest(p), "little") for p in batch["path"]]
    return pd.DataFrame(
        {
            "jpeg": batch["bytes"],
            "label_index": np.full(len(batch), -1, dtype=np.int64),
            "index": np.asarray(index, dtype=np.int64),
        }
    )


def _digest(text: str) -> bytes:
    import hashlib

    return hashlib.blake2b(text.encode(), digest_size=7).digest()


@functools.lru_cache(maxsize=16)
def _transform(mode: Mode, img_size: int, color_constancy: str, camera_p: float):
    if mode == "train":
        return train_transform(img_size, normalize=False, color_constancy=color_constancy,
                               camera_p=camera_p)  # fmt: skip
    return byol_transform(img_size, normalize=False)


def decode_transform_batch(
    batch: dict[str, np.ndarray],
    mode: Mode,
    img_size: int,
    color_constancy: str = "none",
    camera_p: float = 0.0,
) -> dict[str, np.ndarray]:
    """Decode JPEG bytes (`jpeg`, or the files at `path`) and apply the mode's transform;
    unreadable images are dropped + logged.

    The one place where bytes become model input, shared by Ray Data, the benchmark's
    DataLoader baseline and evaluation. Evaluation (validation during training, jobs/evaluate.py)
    decodes and resizes exactly as the server does (`decode_image` towards `decode_side`,
    `eval_pixels`), so a reported score is the served model's. Training streams carry `u`,
    this epoch's seeded random draw per row: the batch's augmentation is seeded from it, so
    seeded runs repeat exactly.
    """
    transform = None if mode == "eval" else _transform(mode, img_size, color_constancy, camera_p)
    if transform is not None and "u" in batch and len(batch["u"]):
        transform.set_random_seed(int(batch["u"][0] * 2**31) ^ int(batch["index"][0]) % 2**31)
    keep, images = [], []
    for i in range(len(batch["index"])):
        try:
            images.append(_decode(encoded_image(batch, i), mode, img_size))
            keep.append(i)
        except (ImageDecodeError, OSError) as exc:
            log.warning("skipping unreadable image (index %s): %s", batch["index"][i], exc)
    index = np.asarray(batch["index"], dtype=np.int64)[keep]
    if mode == "two_view":
        return {
            "view1": _stack([to_uint8_chw(transform, im) for im in images], img_size),
            "view2": _stack([to_uint8_chw(transform, im) for im in images], img_size),
            "index": index,
        }
    if mode == "eval":  # eval_pixels: eval_transform's steps, as the Predictor runs them
        chw = [eval_pixels(im, img_size, color_constancy).transpose(2, 0, 1) for im in images]
    else:
        chw = [to_uint8_chw(transform, im) for im in images]
    return {
        "image": _stack(chw, img_size),
        "label": np.asarray(batch["label_index"], dtype=np.int64)[keep],
        "index": index,
    }


def _decode(data: bytes, mode: Mode, img_size: int) -> np.ndarray:
    """Evaluation decodes as the server does (towards `decode_side`), so validation scores
    what it serves; training and BYOL take the fast full-size decoder."""
    if mode == "eval":
        return decode_image(data, min_short_side=decode_side(img_size))
    return decode_image_fast(data)


def _stack(arrays: list[np.ndarray], img_size: int) -> np.ndarray:
    if not arrays:
        return np.empty((0, 3, img_size, img_size), dtype=np.uint8)
    return np.stack(arrays)


def sampling_repeats(
    table: pd.DataFrame, class_power: float, origin_power: float = 0.0
) -> dict[int, float] | None:
    """Expected copies per epoch of each training row (keyed by row `index`), or None when
    every row is drawn once.

    Class c is drawn with share q_c ∝ n_c^(1 - class_power) while the epoch keeps its size N:
    power 0 is the natural distribution, 1 class-balanced, 0.5 the square-root compromise.
    Inside each class, a row of origin o weighs n_o^(-origin_power) (n_o: the origin's rows in
    `table`), so a source that is rare overall is drawn more often without changing any class's
    share: 0 leaves sources as they come, 1 draws every source equally often where classes
    allow. A row's copies are then about (largest source / its source)^origin_power times its
    class's: at power 1, 20 images of a source 500x smaller than the largest are each drawn
    ~500x as often as one of the largest, so keep the power low for tiny sources (the training
    log names the most-repeated row's copies). Rows without an origin form one source.
    `table` is `SplitRows.table`: indexed by row `index`, with `label_index` and (optional)
    `origin`.
    """
    if class_power == 0 and origin_power == 0:
        return None
    labels = table["label_index"].to_numpy()
    origins = (
        table["origin"].fillna("").astype(str)
        if "origin" in table
        else pd.Series("", index=table.index)
    )
    per_class = pd.Series(labels).value_counts()
    class_share = per_class.astype(float) ** (1.0 - class_power)
    class_share /= class_share.sum()
    weight = origins.map(origins.value_counts()).to_numpy(dtype=float) ** -origin_power
    class_weight = pd.Series(weight).groupby(labels).transform("sum").to_numpy()
    copies = weight / class_weight * len(table) * class_share.reindex(labels).to_numpy()
    return dict(zip(table.index.astype(int).tolist(), copies.tolist(), strict=True))


def _resample(batch: dict[str, np.ndarray], repeats: dict[int, float]) -> dict[str, np.ndarray]:
    """Each row `floor(r)` times, plus once more with probability `frac(r)` (the row's `u`)."""
    r = np.array([repeats.get(int(i), 1.0) for i in batch["index"]])
    copies = np.floor(r).astype(np.int64) + (batch["u"] < r - np.floor(r))
    return {name: np.repeat(column, copies, axis=0) for name, column in batch.items()}


def build_pipeline(
    source: ray.data.Dataset,
    mode: Mode,
    config: PipelineConfig = PipelineConfig(),
    *,
    seed: int | None = None,
    repeats: dict[int, float] | None = None,
) -> ray.data.Dataset:
    """Attach decode + transform to a source; training streams are shuffled every epoch.

    Sources can arrive in few large blocks (Ray's binary-file reader packs files into large
    read tasks), which would leave one task decoding everything; re-cutting them into small
    blocks lets decode+augment run on every CPU and keeps output blocks small (sources already
    cut so, shards' and catalogues', are left as they are). Training and two-view streams
    then randomise the block order anew every epoch (on top of the training loop's local
    shuffle buffer), so a class-sorted catalogue still gives mixed batches; with a
    `seed` the order, the optional class and source resampling (`repeats`, see
    `sampling_repeats`) and the augmentations repeat exactly from run to run. Output order is
    kept (deterministic).
    """
    source.context.execution_options.preserve_order = True
    # Ray Data reserves a share of the CPUs for every operator (list files, read, repartition,
    # decode). On a 2-core machine that held decode+augment, the only heavy operator, to ~1
    # task at a time (profile in docs/benchmarks.md); without the split it uses every CPU.
    source.context.op_resource_reservation_enabled = config.reserve_per_operator
    source.context.enable_progress_bars = config.progress_bars
    source.context.print_on_execution_start = config.progress_bars
    blocks = (
        source
        if _in_small_blocks(source, config.rows_per_block)
        else source.repartition(target_num_rows_per_block=config.rows_per_block)
    )
    if mode != "eval":
        seed_config = RandomSeedConfig(seed=seed, reseed_after_execution=True)
        blocks = blocks.randomize_block_order(seed=seed_config).with_column("u", random(seed=seed))
        if repeats:
            blocks = blocks.map_batches(
                _resample, fn_kwargs={"repeats": repeats}, batch_format="numpy",
                num_cpus=IO_CPUS,
            )  # fmt: skip
    return blocks.map_batches(
        decode_transform_batch,
        fn_kwargs={
            "mode": mode,
            "img_size": config.img_size,
            "color_constancy": config.color_constancy,
            "camera_p": config.camera_p,
        },
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=config.num_cpus,
        concurrency=config.concurrency,
    )


def _in_small_blocks(source: ray.data.Dataset, rows_per_block: int) -> bool:
    """Whether a source is already cut as `build_pipeline` would cut it: a materialised
    dataset whose blocks hold `rows_per_block` rows or fewer on average (`dataset_from_frame`'s,
    i.e. `read_shards` and `read_catalogue_files`). Re-cutting those is a no-op that still
    costs a pass through an operator: 0.26 s more before the first batch (docs/benchmarks.md).
    Its count and block count are metadata, so asking costs nothing."""
    if not isinstance(source, MaterializedDataset):
        return False
    return source.count() <= source.num_blocks() * rows_per_block


IMAGE_KEYS = ("image", "view1", "view2")


class NormalizedBatches:
    """Re-iterable view of torch batches with uint8 images normalised to float32.

    Wraps `iter_torch_batches(...)` (already on the training device), so Lightning can iterate
    it once per epoch and normalisation runs on the GPU when there is one.
    """

    def __init__(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        mean: tuple[float, ...] = DERM_MEAN,
        std: tuple[float, ...] = DERM_STD,
    ):
        self.batches = batches
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch in self.batches:
            yield {
                k: normalize_images(v, self.mean, self.std) if k in IMAGE_KEYS else v
                for k, v in batch.items()
            }
