"""The OOD evaluation set builder (tools/ood_set.py, python -m tools.build_ood_set)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermanet.eval.trust_eval import read_ood_manifest
from dermanet.trust import assess_quality
from tools.ood_set import CHROMIUM, KINDS, build_ood_set

NO_SCREENSHOTS = {"screenshot": 0}
SMALL = {"plot": 3, "document": 2, "photo": 6, "pattern": 9, "noise": 5, "degraded_derm": 5}


def digests(folder: Path) -> dict[str, str]:
    manifest = pd.read_csv(folder / "manifest.csv")
    return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in manifest["path"]}


def test_builds_every_offline_kind(tmp_path: Path, synthetic_dir: Path) -> None:
    report = build_ood_set(
        tmp_path / "ood", synthetic_dir, seed=0, counts={**SMALL, **NO_SCREENSHOTS}
    )
    manifest = report.manifest
    assert report.skipped == {}
    assert manifest["kind"].value_counts().to_dict() == SMALL
    assert list(manifest.columns) == ["path", "kind", "detail"]
    shapes = set()
    for row in read_ood_manifest(tmp_path / "ood").itertuples():
        image = np.asarray(Image.open(row.file).convert("RGB"))
        assert image.ndim == 3 and image.size > 0, row.path
        assert row.path.startswith(f"{row.kind}/")
        shapes.add(image.shape[:2])
    assert len(shapes) >= 8  # several sizes and aspects
    photos = manifest.loc[manifest["kind"] == "photo", "detail"]
    assert photos.str.contains("china").any() and photos.str.contains("grace_hopper").any()
    degraded = manifest.loc[manifest["kind"] == "degraded_derm", "detail"]
    assert degraded.str.contains("SYNTHETIC_").all()  # from the given data set's test split


def test_same_seed_same_images(tmp_path: Path) -> None:
    counts = {**SMALL, **NO_SCREENSHOTS, "degraded_derm": 0}
    build_ood_set(tmp_path / "a", seed=3, counts=counts)
    build_ood_set(tmp_path / "b", seed=3, counts=counts)
    build_ood_set(tmp_path / "c", seed=4, counts=counts)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    changed = set(digests(tmp_path / "a").values()) - set(digests(tmp_path / "c").values())
    assert len(changed) > 15


def test_missing_requirements_are_skipped_with_a_reason(tmp_path: Path) -> None:
    report = build_ood_set(
        tmp_path / "ood",
        derm_sample=tmp_path / "nowhere",
        counts={k: 0 for k in KINDS} | {"screenshot": 2, "degraded_derm": 2, "pattern": 1},
        chromium=tmp_path / "no-chromium",
    )
    assert set(report.skipped) == {"screenshot", "degraded_derm"}
    assert "apt-get install -y chromium" in report.skipped["screenshot"]
    assert "--derm-sample" in report.skipped["degraded_derm"]
    assert report.manifest["kind"].tolist() == ["pattern"]
    with pytest.raises(ValueError, match="unknown kinds"):
        build_ood_set(tmp_path / "x", counts={"selfies": 3})
    with pytest.raises(FileNotFoundError, match=r"tools\.build_ood_set"):
        read_ood_manifest(tmp_path / "empty")


def test_chromium_screenshots_are_refused_by_the_quality_checks(tmp_path: Path) -> None:
    if CHROMIUM is None:
        pytest.skip("no Chromium on PATH: install Debian's chromium (apt-get install -y chromium)")
    counts = {k: 0 for k in KINDS} | {"screenshot": 5}
    report = build_ood_set(tmp_path / "ood", seed=0, counts=counts)
    assert report.skipped == {} and len(report.manifest) == 5
    for row in read_ood_manifest(tmp_path / "ood").itertuples():
        image = np.asarray(Image.open(row.file).convert("RGB"))
        quality = assess_quality(image)
        assert not quality.ok and "flat" in quality.failed, (row.detail, quality.measures)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tools import build_ood_set as job

    counts = [f"--count={k}=0" for k in KINDS if k not in ("pattern", "noise")]
    args = ["--output", str(tmp_path / "ood"), *counts, "--count", "pattern=2"]
    assert job.main([*args, "--count", "noise=1"]) == 0
    assert "3 images" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "ood" / "manifest.csv")) == 3
    assert job.main(["--output", str(tmp_path / "x"), "--count", "selfies=2"]) == 2
    assert "KIND=N" in capsys.readouterr().err
