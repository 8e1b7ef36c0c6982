"""Prepare a catalogue as Parquet shards with Ray Data: decode, resize, re-encode in parallel.

Layout written under the output location (a folder or any pyarrow URI):

    shards/{train,val,test}/*.parquet   one row per image, JPEG bytes in column `jpeg`,
                                        row groups of ROWS_PER_GROUP rows
    manifest.json                       settings, counts per split and class, timings
    errors.csv                          images that could not be read, and why

Corrupt files never stop the job: they are skipped, counted and listed in errors.csv.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermanet import __version__
from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import SPLITS, label_indices
from dermanet.data.images import (
    ImageDecodeError,
    decode_image,
    encode_jpeg,
    shrink_image,
)
from dermanet.data.ray_io import dataset_from_frame
from dermanet.storage import (
    delete_dir_contents,
    exists,
    is_nonempty_dir,
    join,
    read_bytes,
    resolve_filesystem,
    write_bytes,
    write_json,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ERRORS = "errors.csv"
SHARDS = "shards"
SHARD_FORMAT_VERSION = 1
# Small row groups let a decoding task fetch the few images it needs (`shard_image`) without
# reading a whole file; shards written before this have one group per file and still work.
ROWS_PER_GROUP = 128


class ShardsExistError(FileExistsError):
    """The output already holds shards and --overwrite was not given."""


@dataclass
class PrepareReport:
    """What a prepare run wrote: counts per split and class, skipped images, timing."""

    output: str
    written: int
    skipped: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0

    def summary(self) -> str:
        table = pd.DataFrame(self.counts).reindex(list(CLASS_NAMES)).fillna(0).astype(int)
        lines = [
            f"wrote {self.written} images to {self.output} in {self.seconds:.1f} s "
            f"({self.bytes_written / 1e6:.1f} MB of Parquet); skipped {self.skipped} unreadable",
            table.to_string(),
        ]
        if self.errors:
            lines.append(f"skipped images are listed in {join(self.output, ERRORS)}")
        return "\n".join(lines)


def shard_dir(output: str, split: str) -> str:
    """Location of one split's Parquet files."""
    return join(output, SHARDS, split)


def _encode_batch(batch: pd.DataFrame, short_side: int, quality: int) -> pd.DataFrame:
    """Ray Data UDF: read, decode, shrink and re-encode each image; record failures."""
    jpegs: list[bytes | None] = []
    widths, heights, errors = [], [], []
    for path in batch["path"]:
        try:
            image = decode_image(read_bytes(path))
            heights.append(image.shape[0])
            widths.append(image.shape[1])
            jpegs.append(encode_jpeg(shrink_image(image, short_side, "short"), quality))
            errors.append(None)
        except (ImageDecodeError, OSError) as exc:
            jpegs.append(None)
            widths.append(-1)
            heights.append(-1)
            errors.append(str(exc) or type(exc).__name__)
    out = batch.copy()
    out["jpeg"] = jpegs
    out["width"] = np.asarray(widths, dtype=np.int64)
    out["height"] = np.asarray(heights, dtype=np.int64)
    out["error"] = errors
    return out


def _select(batch: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """Rows of one split that decoded (split=None: the rows that failed)."""
    if split is None:
        return batch.loc[batch["error"].notna(), ["image", "path", "error"]]
    keep = batch["error"].isna() & (batch["split"] == split)
    return batch.loc[keep].drop(columns=["error", "path"])


def prepare_shards(
    catalogue: pd.DataFrame,
    output: str,
    short_side: int = 256,
    jpeg_quality: int = 90,
    rows_per_file: int = 2048,
    overwrite: bool = False,
    batch_size: int = 64,
    seed: int = 0,
) -> PrepareReport:
    """Write the catalogue (with its `split` column filled) as Parquet shards under `output`.

    Rows are written in a seeded random order (`index` keeps each row's catalogue position):
    catalogues are often sorted by diagnosis (HAM10000's is), and a training stream read in
    file order would then serve batches of one class.
    """
    if catalogue["split"].isna().any():
        raise ValueError("every catalogue row needs a split: call assign_splits first")
    if exists(join(output, MANIFEST)) or is_nonempty_dir(join(output, SHARDS)):
        if not overwrite:
            raise ShardsExistError(
                f"{output} already holds shards; pass --overwrite to replace them, or choose "
                "another output"
            )
        log.info("overwriting the shards in %s", output)
        delete_dir_contents(output)

    start = time.perf_counter()
    table = catalogue.copy()
    table["label_index"] = label_indices(table)
    table["index"] = np.arange(len(table), dtype=np.int64)
    table = table.sample(frac=1.0, random_state=seed)
    table["age_approx"] = table["age_approx"].astype("float64")
    for column in ("image", "path", "label", "lesion_id", "split", "sex", "anatom_site", "origin"):
        table[column] = table[column].astype(object)
    source = dataset_from_frame(table, rows_per_block=max(batch_size, len(table) // 200 + 1))
    source.context.execution_options.preserve_order = True  # the shuffled order, as written
    encoded = source.map_batches(
        _encode_batch,
        fn_kwargs={"short_side": short_side, "quality": jpeg_quality},
        batch_size=batch_size,
        batch_format="pandas",
    ).materialize()
    fs, _ = resolve_filesystem(output)
    for split in SPLITS:
        part = encoded.map_batches(
            _select, fn_kwargs={"split": split}, batch_format="pandas", num_cpus=0.25
        )
        _, path = resolve_filesystem(shard_dir(output, split))
        part.write_parquet(
            path, filesystem=fs, min_rows_per_file=rows_per_file, row_group_size=ROWS_PER_GROUP
        )
    failures = encoded.map_batches(
        _select, fn_kwargs={"split": None}, batch_format="pandas", num_cpus=0.25
    )
    errors = failures.to_pandas()
    written = encoded.select_columns(["split", "label", "error"]).to_pandas()
    counts = written.loc[written["error"].isna()]
    per_split = {s: counts.loc[counts.split == s, "label"].value_counts().to_dict() for s in SPLITS}
    report = PrepareReport(
        output=str(output),
        written=len(counts),
        skipped=len(errors),
        counts={s: {c: int(v) for c, v in d.items()} for s, d in per_split.items()},
        errors=errors.astype(str).to_dict("records"),
        seconds=time.perf_counter() - start,
        bytes_written=_total_bytes(output),
    )
    buffer = io.StringIO()
    errors.to_csv(buffer, index=False)
    write_bytes(join(output, ERRORS), buffer.getvalue().encode())
    write_json(join(output, MANIFEST), _manifest(report, short_side, jpeg_quality))
    log.info("wrote %d images, skipped %d, to %s", report.written, report.skipped, output)
    return report


def _total_bytes(output: str) -> int:
    import pyarrow.fs as pafs

    fs, path = resolve_filesystem(join(output, SHARDS))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def _manifest(report: PrepareReport, short_side: int, quality: int) -> dict[str, Any]:
    return {
        "format_version": SHARD_FORMAT_VERSION,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "dermanet_version": __version__,
        "class_names": list(CLASS_NAMES),
        "short_side": short_side,
        "jpeg_quality": quality,
        "written": report.written,
        "skipped": report.skipped,
        "counts": report.counts,
        "seconds": round(report.seconds, 2),
        "bytes": report.bytes_written,
    }


def shard_image(file: str, row: int) -> bytes:
    """The encoded image at position `row` of a shard file (any pyarrow location).

    Training streams shard rows as references (`pipelines.read_shards`) and each decoding task
    fetches bytes here. A row group is read whole, so it is kept for the rows that follow
    (`_GROUPS`, bounded in bytes: older shards hold a whole 10 MB file in one group); shards
    are never rewritten in place (--overwrite deletes them first), so nothing goes stale.
    """
    starts = _row_group_starts(file)
    if not 0 <= row < starts[-1]:
        raise IndexError(f"{file} has {starts[-1]} rows, no row {row}")
    group = int(np.searchsorted(starts, row, side="right")) - 1
    return _GROUPS.images(file, group)[row - starts[group]].as_py()


@functools.lru_cache(maxsize=1024)
def _row_group_starts(file: str) -> tuple[int, ...]:
    """Row position where each row group of `file` starts, plus its row count at the end."""
    metadata = _open_shard(file).metadata
    sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    return tuple(int(s) for s in np.cumsum([0, *sizes]))


def _open_shard(file: str) -> pq.ParquetFile:
    filesystem, path = resolve_filesystem(file)
    return pq.ParquetFile(path, filesystem=filesystem)


class _RowGroupCache:
    """The `jpeg` column of recently read row groups, least recently used dropped first once
    they hold more than `max_bytes` (one cache per process)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._groups: OrderedDict[tuple[str, int], pa.Array] = OrderedDict()

    def images(self, file: str, group: int) -> pa.Array:
        key = (file, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        column = _open_shard(file).read_row_group(group, columns=["jpeg"]).column(0)
        images = column.combine_chunks()
        self._groups[key] = images
        while len(self._groups) > 1 and self.nbytes > self.max_bytes:
            self._groups.popitem(last=False)
        return images

    @property
    def nbytes(self) -> int:
        return sum(images.nbytes for images in self._groups.values())


_GROUPS = _RowGroupCache(max_bytes=64 * 2**20)


def read_manifest(output: str) -> dict[str, Any]:
    """The manifest of a prepared shard set, with a clear error when there is none."""
    from dermanet.storage import read_json

    location = join(output, MANIFEST)
    if not exists(location):
        raise FileNotFoundError(
            f"{output} holds no prepared shards ({MANIFEST} missing); run jobs/prepare_data.py"
        )
    return read_json(location)
