"""Ray Data: shards round trip, streamed batch contract, determinism, Ray Train ingestion."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import load_job

from dermanet.data import assign_splits, read_plain_csv
from dermanet.data.pipelines import (
    SHARD_REFERENCE_COLUMNS,
    PipelineConfig,
    build_pipeline,
    encoded_image,
    read_catalogue_files,
    read_image_folders,
    read_shards,
    sampling_repeats,
    shard_rows,
)
from dermanet.data.ray_io import dataset_from_frame
from dermanet.data.shards import (
    ROWS_PER_GROUP,
    ShardsExistError,
    prepare_shards,
    read_manifest,
    shard_dir,
    shard_image,
)
from dermanet.data.sources import DataLocation, catalogue_rows, split_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[1]


def _shard_rows(output: str) -> pd.DataFrame:
    frames = []
    for split in ("train", "val", "test"):
        for file in sorted(Path(shard_dir(output, split)).glob("*.parquet")):
            frames.append(pq.read_table(file).to_pandas().assign(shard_split=split))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def synthetic_with_corrupt(tmp_path_factory, synthetic_dir: Path) -> tuple[pd.DataFrame, set]:
    """A split synthetic catalogue whose folder holds two planted corrupt files."""
    root = tmp_path_factory.mktemp("corrupt")
    shutil.copytree(synthetic_dir, root, dirs_exist_ok=True)
    cat = assign_splits(read_plain_csv(root / "metadata.csv", root / "images"), seed=1)
    bad = cat["image"].iloc[[3, 10]].tolist()
    Path(cat["path"].iloc[3]).write_text("I am a text file named .jpg")
    data = Path(cat["path"].iloc[10]).read_bytes()
    Path(cat["path"].iloc[10]).write_bytes(data[: len(data) // 3])
    return cat, set(bad)


@pytest.fixture(scope="module")
def synthetic_shards(ray_local, tmp_path_factory, synthetic_with_corrupt) -> str:
    cat, _ = synthetic_with_corrupt
    out = str(tmp_path_factory.mktemp("shards"))
    prepare_shards(cat, out, short_side=48, rows_per_file=50)
    return out


def test_round_trip_skips_and_reports_corrupt(synthetic_shards: str, synthetic_with_corrupt):
    cat, bad = synthetic_with_corrupt
    rows = _shard_rows(synthetic_shards)
    expected = cat.loc[~cat["image"].isin(bad)]
    assert sorted(rows["image"]) == sorted(expected["image"])  # each valid image exactly once
    merged = rows.merge(cat, on="image", suffixes=("", "_cat"))
    assert (merged["split"] == merged["split_cat"]).all()
    assert (merged["split"] == merged["shard_split"]).all()
    assert (merged["label"] == merged["label_cat"]).all()
    assert (merged["lesion_id"] == merged["lesion_id_cat"]).all()
    assert (rows["width"] == 64).all() and (rows["height"] == 64).all()
    manifest = read_manifest(synthetic_shards)
    assert manifest["written"] == len(expected) and manifest["skipped"] == 2
    assert sum(manifest["counts"]["train"].values()) == (expected["split"] == "train").sum()
    errors = pd.read_csv(Path(synthetic_shards) / "errors.csv")
    assert set(errors["image"]) == bad
    assert errors["error"].str.contains("not an image format|corrupt or truncated").all()


def test_rerun_is_refused_without_overwrite(ray_local, synthetic_with_corrupt, tmp_path):
    cat, _ = synthetic_with_corrupt
    small = cat.groupby("split").head(4)
    uri = f"file://{tmp_path}/uri-shards"  # pyarrow's local-filesystem URI form
    prepare_shards(small, uri, short_side=32)
    with pytest.raises(ShardsExistError, match="pass --overwrite"):
        prepare_shards(small, uri, short_side=32)
    report = prepare_shards(small, uri, short_side=32, overwrite=True)
    assert report.written + report.skipped == len(small)
    assert len(_shard_rows(str(tmp_path / "uri-shards"))) == report.written
    # Streaming reads the URI too: every row of every split, with only the training columns.
    streamed = {split: read_shards(uri, split).take_all() for split in ("train", "val", "test")}
    assert sum(len(rows) for rows in streamed.values()) == report.written
    assert set(streamed["train"][0]) == {"file", "row", "label_index", "index"}
    with pytest.raises(FileNotFoundError, match=r"run jobs/prepare_data\.py"):
        read_shards(f"file://{tmp_path}/nothing-here", "train")


def test_shard_rows_are_references_to_the_stored_images(synthetic_shards: str, tmp_path) -> None:
    """Streamed shard rows carry a file and row position; the decoding task fetches the bytes,
    a row group at a time (groups of ROWS_PER_GROUP in new shards, one per file in older ones)."""
    stored = _shard_rows(synthetic_shards).set_index("index")
    refs = pd.DataFrame(read_shards(synthetic_shards, "train").take_all())
    assert len(refs) == (stored["shard_split"] == "train").sum()
    for i in range(len(refs)):
        assert encoded_image(refs, i) == stored.loc[int(refs["index"].iloc[i]), "jpeg"]
    some = set(refs["index"].iloc[::3].tolist())
    kept = read_shards(synthetic_shards, "train", keep_index=some).take_all()
    assert {int(r["index"]) for r in kept} == some

    metadata = pq.ParquetFile(refs["file"].iloc[0]).metadata
    groups = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    assert max(groups) <= ROWS_PER_GROUP and sum(groups) == metadata.num_rows

    # A shard written as one row group (before ROWS_PER_GROUP) reads the same way.
    table = pq.read_table(refs["file"].iloc[0])
    single = str(tmp_path / "single.parquet")
    pq.write_table(table.slice(0, 30), single, row_group_size=1_000)
    assert pq.ParquetFile(single).metadata.num_row_groups == 1
    assert shard_image(single, 29) == table["jpeg"][29].as_py()
    with pytest.raises(IndexError, match="has 30 rows, no row 30"):
        shard_image(single, 30)


def _collect(ds, batch_size: int = 16) -> list[dict]:
    return [
        {k: v.numpy() for k, v in b.items()} for b in ds.iter_torch_batches(batch_size=batch_size)
    ]


def test_streamed_batches_contract(synthetic_shards: str) -> None:
    config = PipelineConfig(img_size=40)
    batches = _collect(build_pipeline(read_shards(synthetic_shards, "train"), "train", config))
    assert sum(len(b["label"]) for b in batches) > 50
    first = batches[0]
    assert first["image"].shape == (16, 3, 40, 40) and first["image"].dtype == np.uint8
    assert first["label"].dtype == np.int64 and first["index"].dtype == np.int64
    assert set(np.concatenate([b["label"] for b in batches])) <= set(range(8))
    assert first["image"].std() > 10  # real pixel content, not a blank


def test_normalised_batches_match_the_serving_preprocessing(
    synthetic_shards: str, synthetic_with_corrupt
) -> None:
    """Evaluation normalises uint8 on the device; the server decodes, resizes and normalises
    with its Preprocessing: the same numbers."""
    from dermanet.data.pipelines import NormalizedBatches
    from dermanet.data.transforms import DERM_MEAN, DERM_STD, pixels_to_tensor
    from dermanet.inference.predictor import Preprocessing

    ds = build_pipeline(read_shards(synthetic_shards, "val"), "eval", PipelineConfig(img_size=32))
    batch = next(iter(NormalizedBatches(ds.iter_torch_batches(batch_size=4))))
    assert batch["image"].dtype == torch.float32
    rows = _shard_rows(synthetic_shards).set_index("index")
    for image, index in zip(batch["image"], batch["index"], strict=True):
        served = Preprocessing(32)
        pixels = served.pixels(served.decode(rows.loc[int(index), "jpeg"]))
        expected = pixels_to_tensor([pixels], DERM_MEAN, DERM_STD)[0].numpy()
        np.testing.assert_allclose(image.numpy(), expected, atol=1e-5)


def test_training_batches_mix_classes_of_a_class_sorted_catalogue(
    ray_local, synthetic_with_corrupt, tmp_path: Path
) -> None:
    """HAM10000's metadata is sorted by diagnosis: training must still see mixed batches."""
    cat, bad = synthetic_with_corrupt
    good = cat.loc[~cat["image"].isin(bad)].reset_index(drop=True)
    labels = ["AK", "BCC", "MEL", "NV"]
    sorted_cat = pd.DataFrame(
        {
            "image": [f"copy_{i:04d}" for i in range(480)],
            "path": [good["path"].iloc[i % len(good)] for i in range(480)],
            "label": [labels[i // 120] for i in range(480)],  # four runs of 120 rows
            "lesion_id": [f"copy_{i:04d}" for i in range(480)],
            "split": "train",
        }
    ).reindex(columns=list(good.columns))
    out = str(tmp_path / "sorted")
    prepare_shards(sorted_cat, out, short_side=32, rows_per_file=100)
    ds = build_pipeline(read_shards(out, "train"), "train", PipelineConfig(img_size=16), seed=0)
    # Exactly what a training worker iterates (batch 8 with a buffer of 8 batches), two epochs.
    for _ in range(2):
        batches = list(
            ds.iter_batches(batch_size=8, local_shuffle_buffer_size=64, local_shuffle_seed=0,
                            drop_last=True)
        )  # fmt: skip
        mixed = np.mean([len(set(b["label"].tolist())) >= 2 for b in batches])
        assert mixed >= 0.9, f"only {mixed:.0%} of the batches mix classes"


def test_training_stream_draws_new_order_and_augmentation_every_epoch_and_repeats_by_seed(
    synthetic_shards: str,
) -> None:
    """Each epoch (an execution of the same pipeline) takes a new block order and new
    augmentation draws; a pipeline built again with the same seed repeats them exactly."""
    rows = shard_rows(synthetic_shards, "train").loc[:, list(SHARD_REFERENCE_COLUMNS)]
    config = PipelineConfig(img_size=16, rows_per_block=4)

    def three_epochs(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        source = dataset_from_frame(rows, rows_per_block=config.rows_per_block)
        ds = build_pipeline(source, "train", config, seed=seed)
        epochs = []
        for _ in range(3):
            batches = list(ds.iter_batches(batch_size=8, batch_format="numpy"))
            epochs.append(
                tuple(np.concatenate([b[k] for b in batches]) for k in ("index", "image"))
            )
        return epochs

    first, again = three_epochs(0), three_epochs(0)
    for (index, image), (index_again, image_again) in zip(first, again, strict=True):
        np.testing.assert_array_equal(index, index_again)
        np.testing.assert_array_equal(image, image_again)
        assert sorted(index.tolist()) == sorted(rows["index"].tolist())
    orders = [tuple(index.tolist()) for index, _ in first]
    assert len(set(orders)) == 3, "two epochs streamed the same order"
    (index0, image0), (index1, image1) = first[0], first[1]
    by_index0, by_index1 = image0[np.argsort(index0)], image1[np.argsort(index1)]
    assert not np.array_equal(by_index0, by_index1), "two epochs drew the same augmentations"


def test_split_rows_of_shards_describe_what_they_stream_by_origin(
    ray_local, synthetic_with_corrupt, tmp_path: Path
) -> None:
    """A leave-one-source-out run reads shards once: the table that names each row and the
    rows it streams are the same images, of the kept sources only."""
    cat, bad = synthetic_with_corrupt
    good = cat.loc[~cat["image"].isin(bad)].reset_index(drop=True)
    good["origin"] = np.where(np.arange(len(good)) % 3 == 0, "clinic_b", "clinic_a")
    out = str(tmp_path / "by-origin")
    prepare_shards(good, out, short_side=32, rows_per_file=40)
    location = DataLocation(shards=out)
    kept = split_rows(location, ["train", "val"], exclude_origins=["clinic_b"])
    assert set(kept.table["origin"]) == {"clinic_a"}
    assert list(kept.table.columns) == ["image", "label_index", "origin"]
    streamed = pd.DataFrame(kept.dataset.take_all()).set_index("index")
    assert sorted(streamed.index) == sorted(kept.table.index)
    np.testing.assert_array_equal(
        streamed["label_index"].to_numpy(dtype=np.int64),
        kept.table.loc[streamed.index, "label_index"].to_numpy(dtype=np.int64),
    )
    expected = good.loc[(good["origin"] == "clinic_a") & good["split"].isin(["train", "val"])]
    assert sorted(kept.table["image"]) == sorted(expected["image"])
    other = split_rows(location, "all", origins=["clinic_b"])
    assert sorted(other.table["image"]) == sorted(good.loc[good["origin"] == "clinic_b", "image"])
    assert len(other.dataset.take_all()) == len(other.table)


def test_resampled_training_stream_draws_the_rare_source_more(
    ray_local, synthetic_with_corrupt, tmp_path: Path
) -> None:
    """--origin-sampling-power reaches the stream a worker trains on: the rare source's share
    of an epoch rises to what `sampling_repeats` planned, and the epoch keeps its size."""
    cat, bad = synthetic_with_corrupt
    good = cat.loc[~cat["image"].isin(bad)].reset_index(drop=True)
    good = pd.concat([good] * 4, ignore_index=True)  # enough rows for shares to settle
    good["image"] = [f"copy_{i:04d}" for i in range(len(good))]
    good["lesion_id"] = good["image"]
    good["split"] = "train"
    good["origin"] = np.where(np.arange(len(good)) % 4 == 0, "rare", "common")
    out = str(tmp_path / "sources")
    prepare_shards(good, out, short_side=16, rows_per_file=60)
    rows = split_rows(DataLocation(shards=out), "train")
    repeats = sampling_repeats(rows.table, 0.0, 1.0)
    assert repeats is not None
    planned = pd.Series(repeats).reindex(rows.table.index).groupby(rows.table["origin"]).sum()
    assert planned["rare"] / planned.sum() > 0.45  # natural share 0.25
    config = PipelineConfig(img_size=16)
    epoch = build_pipeline(rows.dataset, "train", config, seed=0, repeats=repeats).take_all()
    streamed = rows.table.loc[[int(r["index"]) for r in epoch], "origin"]
    assert len(epoch) == pytest.approx(len(rows.table), rel=0.1)
    assert (streamed == "rare").mean() == pytest.approx(planned["rare"] / planned.sum(), abs=0.06)


def test_only_sources_in_large_blocks_are_recut(synthetic_shards: str, synthetic_dir) -> None:
    """Shards (one split or several) and catalogue rows arrive in blocks of
    `PipelineConfig.rows_per_block` rows: a repartition would only delay the first batch.
    Image folders arrive in few large read blocks and still need it."""
    config = PipelineConfig(img_size=16)
    for mode in ("train", "eval"):
        shards = build_pipeline(read_shards(synthetic_shards, "train"), mode, config, seed=0)
        assert "Repartition" not in repr(shards), repr(shards)
    rows = split_rows(DataLocation(shards=synthetic_shards), ["train", "val"])  # two splits
    assert "Repartition" not in repr(build_pipeline(rows.dataset, "train", config, seed=0))
    plain = read_plain_csv(synthetic_dir / "metadata.csv", synthetic_dir / "images")
    cat = catalogue_rows(assign_splits(plain, seed=0))
    files = build_pipeline(read_catalogue_files(cat), "eval", config)
    assert "Repartition" not in repr(files), repr(files)
    folders = build_pipeline(read_image_folders([str(synthetic_dir / "images")]), "eval", config)
    assert "Repartition" in repr(folders), repr(folders)

    # Shards cut at the pipeline's block size are left so; shards in larger blocks are re-cut.
    four = replace(config, rows_per_block=4)
    small = read_shards(synthetic_shards, "train", rows_per_block=4)
    assert small.num_blocks() == -(-small.count() // 4) > 1
    assert "Repartition" not in repr(build_pipeline(small, "train", four, seed=0))
    default = read_shards(synthetic_shards, "train")
    assert "Repartition" in repr(build_pipeline(default, "train", four, seed=0))


def test_two_views_differ(synthetic_shards: str) -> None:
    ds = build_pipeline(
        read_shards(synthetic_shards, "val"), "two_view", PipelineConfig(img_size=32)
    )
    batch = _collect(ds, batch_size=8)[0]
    assert batch["view1"].shape == batch["view2"].shape == (8, 3, 32, 32)
    assert not np.allclose(batch["view1"], batch["view2"])


def test_eval_pipeline_is_deterministic(synthetic_shards: str) -> None:
    runs = []
    for _ in range(2):
        ds = build_pipeline(read_shards(synthetic_shards, "train"), "eval", PipelineConfig(32))
        runs.append(_collect(ds))
    order = [np.concatenate([b["index"] for b in run]) for run in runs]
    np.testing.assert_array_equal(order[0], order[1])
    images = [np.concatenate([b["image"] for b in run]) for run in runs]
    np.testing.assert_array_equal(images[0], images[1])


def test_frame_blocks_get_new_columns_in_every_row(ray_local) -> None:
    """Training adds a per-row random draw (`with_column`); Ray Data aligned it by the pandas
    index, so blocks cut from a catalogue after the first 256 rows got NaN and a training
    stream from raw files over 256 images failed."""
    from ray.data.expressions import random

    ds = dataset_from_frame(pd.DataFrame({"index": np.arange(600)}), rows_per_block=256)
    batches = ds.with_column("u", random(seed=0)).iter_batches(batch_format="numpy")
    u = np.concatenate([b["u"] for b in batches])
    assert len(u) == 600 and not np.isnan(u).any()


def test_raw_file_and_folder_sources(ray_local, synthetic_with_corrupt, synthetic_dir) -> None:
    cat, bad = synthetic_with_corrupt
    rows = catalogue_rows(cat)
    val_rows = rows.loc[rows["split"] == "val"]
    gone = val_rows.iloc[:1].assign(path="/nonexistent/ISIC_0.jpg", index=10**6)
    # each decode task reads its own files: a corrupt or a vanished file is dropped, not fatal
    ds = build_pipeline(
        read_catalogue_files(pd.concat([val_rows, gone])), "eval", PipelineConfig(32)
    )
    seen = np.concatenate([b["index"] for b in _collect(ds)])
    val = cat.reset_index(drop=True)
    expected = val.index[(val["split"] == "val") & ~val["image"].isin(bad)].to_numpy()
    np.testing.assert_array_equal(np.sort(seen), expected)  # corrupt rows dropped, not fatal
    ds = build_pipeline(
        read_image_folders([str(synthetic_dir / "images")]), "two_view", PipelineConfig(32)
    )
    total = sum(len(b["index"]) for b in _collect(ds, batch_size=32))
    assert total == len(list((synthetic_dir / "images").glob("*.jpg")))


def test_ray_train_workers_consume_shards(synthetic_shards: str, tmp_path: Path) -> None:
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_func(config: dict) -> None:
        shard = ray.train.get_dataset_shard("train")
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=8, drop_last=True):
            assert batch["image"].shape[1:] == (3, 32, 32)
            seen += len(batch["label"])
        # Train V2 keeps the metrics that come with a checkpoint: rank 0 reports one.
        rank = ray.train.get_context().get_world_rank()
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "seen.txt").write_text(str(seen))
            checkpoint = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
            ray.train.report({"seen": seen}, checkpoint=checkpoint)

    ds = build_pipeline(read_shards(synthetic_shards, "train"), "train", PipelineConfig(32))
    trainer = TorchTrainer(
        train_func,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path), name="ingest"),
        datasets={"train": ds},
    )
    result = trainer.fit()
    assert result.error is None
    assert result.metrics["seen"] >= 8


@pytest.mark.sample
def test_derm_sample_round_trip(ray_local, derm_sample_catalogue, tmp_path: Path) -> None:
    cat = assign_splits(derm_sample_catalogue, seed=0).sample(n=300, random_state=0)
    out = str(tmp_path / "derm")
    report = prepare_shards(cat, out, short_side=128)
    assert report.skipped == 0 and report.written == 300
    rows = _shard_rows(out)
    assert sorted(rows["image"]) == sorted(cat["image"])
    assert (
        rows.merge(cat, on="image")[["label_x", "split_x"]].values
        == rows.merge(cat, on="image")[["label_y", "split_y"]].values
    ).all()
    assert (rows[["width", "height"]].min(axis=1) >= 128).all()


def test_prepare_job_help_explains_every_flag() -> None:
    parser = load_job("prepare_data").build_parser()
    for action in parser._actions:
        assert action.help, f"flag {action.option_strings} has no help text"
    required = {a.dest for a in parser._actions if a.required}
    assert required == {"csv", "images", "output"}


def test_prepare_job_refuses_bad_settings_in_one_line_before_ray(capsys) -> None:
    job = load_job("prepare_data")
    with pytest.raises(SystemExit) as exit_:
        job.main(["--csv", "c.csv", "--images", "img"])
    assert exit_.value.code == 2 and "--output" in capsys.readouterr().err
    code = job.main(["--csv", "c.csv", "--images", "i", "--output", "o", "--jpeg-quality", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "error: invalid settings, need: --jpeg-quality >= 1 (got 0)"
