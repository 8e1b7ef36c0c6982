"""Catalogue readers: each format, image lookup by id, and clear errors on bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from dermanet.data import (
    CATALOGUE_COLUMNS,
    CatalogueError,
    detect_format,
    read_catalogue,
    read_ham10000,
    read_isic2019,
    read_plain_csv,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def image_dir(tmp_path: Path, synthetic_dir: Path) -> Path:
    """Four images named the ways ISIC folders name them."""
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    src = sorted((synthetic_dir / "images").glob("*.jpg"))
    shutil.copy(src[0], folder / "ISIC_0000001.jpg")
    shutil.copy(src[1], folder / "ISIC_0000002.JPEG")
    shutil.copy(src[2], folder / "nested" / "ISIC_0000003_downsampled.jpg")
    from PIL import Image

    Image.open(src[3]).save(folder / "ISIC_0000004.png")
    return folder


def test_plain_csv_on_synthetic(synthetic_dir: Path) -> None:
    cat = read_plain_csv(synthetic_dir / "metadata.csv", synthetic_dir / "images")
    assert list(cat.columns) == list(CATALOGUE_COLUMNS)
    assert len(cat) == 160
    assert cat["path"].map(lambda p: Path(p).is_file()).all()
    assert cat["lesion_id"].nunique() < len(cat)  # some lesions have two images
    assert cat["split"].isna().all()


def test_images_found_by_id_whatever_the_extension(tmp_path: Path, image_dir: Path) -> None:
    csv = _write(
        tmp_path / "c.csv",
        "image,label,anatom_site_general\nISIC_0000001,MEL,back\nISIC_0000002,nv,\n"
        "ISIC_0000003,BCC,\nISIC_0000004,VASC,\n",
    )
    cat = read_plain_csv(csv, image_dir)
    names = {r.image: Path(r.path).name for r in cat.itertuples()}
    assert names == {
        "ISIC_0000001": "ISIC_0000001.jpg",
        "ISIC_0000002": "ISIC_0000002.JPEG",
        "ISIC_0000003": "ISIC_0000003_downsampled.jpg",
        "ISIC_0000004": "ISIC_0000004.png",
    }
    assert cat.loc[cat.image == "ISIC_0000002", "label"].item() == "NV"  # normalised case
    assert cat.loc[cat.image == "ISIC_0000001", "anatom_site"].item() == "back"
    assert (cat["lesion_id"] == cat["image"]).all()  # unknown lesion -> the image id


def test_missing_images_error_or_drop(tmp_path: Path, image_dir: Path) -> None:
    rows = "".join(f"ISIC_99{i:05d},NV\n" for i in range(7))
    csv = _write(tmp_path / "c.csv", "image,label\nISIC_0000001,MEL\n" + rows)
    with pytest.raises(CatalogueError) as err:
        read_plain_csv(csv, image_dir)
    message = str(err.value)
    assert "7 (first 5: ISIC_9900000, ISIC_9900001" in message
    assert "images have no file" in message and "--drop-missing" in message
    dropped = read_plain_csv(csv, image_dir, missing="drop")
    assert dropped["image"].tolist() == ["ISIC_0000001"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "image,label\nISIC_0000001,MEL\nISIC_0000002,XYZ\n",
            r"1 \(ISIC_0000002=XYZ\) rows have unknown labels",
        ),
        (
            "image,label\nISIC_0000001,MEL\nISIC_0000001,NV\n",
            r"1 \(ISIC_0000001\) image ids appear more than once",
        ),
        ("name,diagnosis\na,MEL\n", r"missing required columns \['image', 'label'\]"),
        ("image,label\n", "the table has no rows"),
        ("", "the file is empty"),
    ],
)
def test_malformed_plain_csv(tmp_path: Path, image_dir: Path, text: str, expected: str) -> None:
    csv = _write(tmp_path / "bad.csv", text)
    with pytest.raises(CatalogueError, match=expected):
        read_plain_csv(csv, image_dir)


def test_missing_csv_and_folder(tmp_path: Path, image_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"catalogue CSV .* does not exist"):
        read_catalogue(tmp_path / "none.csv", image_dir)
    csv = _write(tmp_path / "c.csv", "image,label\nISIC_0000001,MEL\n")
    with pytest.raises(FileNotFoundError, match=r"image folder .* does not exist"):
        read_plain_csv(csv, tmp_path / "no-images")


ISIC_HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"


def test_isic2019_ground_truth_with_metadata(tmp_path: Path, image_dir: Path) -> None:
    truth = _write(
        tmp_path / "ISIC_2019_Training_GroundTruth.csv",
        ISIC_HEADER + "ISIC_0000001,1.0,0,0,0,0,0,0,0,0\nISIC_0000002,0,0,0,0,0,0,0,1.0,0\n"
        "ISIC_0000003,0,0,0,1.0,0,0,0,0,0\n",
    )
    meta = _write(
        tmp_path / "ISIC_2019_Training_Metadata.csv",
        "image,age_approx,anatom_site_general,lesion_id,sex\n"
        "ISIC_0000001,55.0,anterior torso,BCN_0000001,female\n"
        "ISIC_0000003,,,BCN_0000001,\n",
    )
    assert detect_format(truth) == "isic2019"
    cat = read_catalogue(truth, image_dir, metadata_csv=meta)
    assert cat.set_index("image")["label"].to_dict() == {
        "ISIC_0000001": "MEL",
        "ISIC_0000002": "SCC",
        "ISIC_0000003": "AK",
    }
    row = cat.set_index("image").loc["ISIC_0000001"]
    assert (row.lesion_id, row.age_approx, row.sex, row.anatom_site) == (
        "BCN_0000001",
        55.0,
        "female",
        "anterior torso",
    )
    assert cat.set_index("image").loc["ISIC_0000002", "lesion_id"] == "ISIC_0000002"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (
            "ISIC_0000001,1,1,0,0,0,0,0,0,0",
            r"1 \(ISIC_0000001\) rows do not have exactly one class",
        ),
        ("ISIC_0000001,0,0,0,0,0,0,0,0,0", "do not have exactly one class"),
        ("ISIC_0000001,0,0,0,0,0,0,0,0,1", r"labelled UNK, which is not a training class"),
        ("ISIC_0000001,x,0,0,0,0,0,0,0,0", "must hold 0/1 numbers"),
    ],
)
def test_isic2019_malformed(tmp_path: Path, image_dir: Path, row: str, expected: str) -> None:
    truth = _write(tmp_path / "gt.csv", ISIC_HEADER + row + "\n")
    with pytest.raises(CatalogueError, match=expected):
        read_isic2019(truth, image_dir)


def test_ham10000_codes_and_errors(tmp_path: Path, image_dir: Path) -> None:
    header = "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
    good = _write(
        tmp_path / "HAM10000_metadata.csv",
        header + "HAM_1,ISIC_0000001,akiec,histo,80.0,male,scalp\n"
        "HAM_1,ISIC_0000002,akiec,histo,80.0,unknown,unknown\n"
        "HAM_2,ISIC_0000003,vasc,consensus,,female,back\n",
    )
    assert detect_format(good) == "ham10000"
    cat = read_catalogue(good, image_dir)
    assert cat["label"].tolist() == ["AK", "AK", "VASC"]
    assert cat["lesion_id"].tolist() == ["HAM_1", "HAM_1", "HAM_2"]
    assert cat["sex"].tolist()[1] is None and cat["anatom_site"].tolist()[1] is None
    bad = _write(tmp_path / "bad.csv", header + "HAM_1,ISIC_0000001,melanoma,histo,,,\n")
    with pytest.raises(CatalogueError, match=r"1 \(ISIC_0000001=melanoma\) rows have unknown dx"):
        read_ham10000(bad, image_dir)


def test_unrecognised_header(tmp_path: Path) -> None:
    csv = _write(tmp_path / "x.csv", "foo,bar\n1,2\n")
    with pytest.raises(CatalogueError, match="unrecognised header"):
        detect_format(csv)


@pytest.mark.sample
def test_real_ham10000_metadata(formats_dir: Path, derm_sample: Path) -> None:
    cat = read_catalogue(formats_dir / "HAM10000_metadata.csv", derm_sample / "images")
    assert len(cat) == 10015
    assert cat["lesion_id"].nunique() == 7470
    assert set(cat["label"]) == {"AK", "BCC", "BKL", "DF", "MEL", "NV", "VASC"}


@pytest.mark.sample
def test_real_isic2019_table_reports_then_drops_missing(
    formats_dir: Path, derm_sample: Path
) -> None:
    csv = formats_dir / "isic_2019_common.csv"
    with pytest.raises(CatalogueError, match="images have no file"):
        read_catalogue(csv, derm_sample / "images")
    cat = read_catalogue(csv, derm_sample / "images", missing="drop")
    total = len(pd.read_csv(csv))
    assert total == 25331
    assert 12500 < len(cat) < 13085  # the README says about 12,800 are in derm-sample
    assert not cat["image"].str.endswith("_downsampled").any()
    assert cat["anatom_site"].notna().any()


@pytest.mark.sample
def test_real_derm_sample_catalogue(derm_sample_catalogue: pd.DataFrame) -> None:
    assert len(derm_sample_catalogue) == 13085
    counts = derm_sample_catalogue["label"].value_counts().to_dict()
    assert counts["NV"] == 8587 and counts["DF"] == 122
