"""Readers for the catalogue sources DermaNet accepts.

1. plain CSV `image,label[,lesion_id,age_approx,sex,anatom_site]` + image folder;
2. the official ISIC 2019 ground truth (one-hot) + optional ISIC 2019 metadata;
3. HAM10000 metadata (dx codes).
`read_catalogue` recognises the format from the header, so users pass just a path.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dermanet.classes import CLASS_NAMES
from dermanet.data.catalogue import CatalogueError, describe_offenders, finalize_catalogue

ISIC2019_ONE_HOT = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
HAM10000_DX = {
    "akiec": "AK",
    "bcc": "BCC",
    "bkl": "BKL",
    "df": "DF",
    "mel": "MEL",
    "nv": "NV",
    "vasc": "VASC",
}
# Column spellings seen in the wild, mapped to catalogue names.
PLAIN_ALIASES = {
    "anatom_site_general": "anatom_site",
    "anatom_site_general_challenge": "anatom_site",
}


def _read_csv(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"catalogue CSV {path} does not exist")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=True, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise CatalogueError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"{path}: not a readable CSV ({exc})") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table


def _require_columns(
    table: pd.DataFrame, required: tuple[str, ...], source: str, hint: str
) -> None:
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise CatalogueError(
            f"{source}: missing required columns {missing}; found {list(table.columns)}. {hint}"
        )


def read_plain_csv(
    csv_path: str | Path, image_dir: str | Path, missing: str = "error"
) -> pd.DataFrame:
    """`image,label[,lesion_id,age_approx,sex,anatom_site]` (e.g. derm-sample, isic_2019_common)."""
    table = _read_csv(csv_path).rename(columns=PLAIN_ALIASES)
    _require_columns(
        table, ("image", "label"), str(csv_path), "Expected header: image,label[,lesion_id,...]"
    )
    return finalize_catalogue(table, image_dir, source=str(csv_path), missing=missing)


def read_isic2019(
    ground_truth_csv: str | Path,
    image_dir: str | Path,
    metadata_csv: str | Path | None = None,
    missing: str = "error",
) -> pd.DataFrame:
    """ISIC_2019_Training_GroundTruth.csv (+ ISIC_2019_Training_Metadata.csv)."""
    source = str(ground_truth_csv)
    truth = _read_csv(ground_truth_csv)
    _require_columns(
        truth,
        ("image", *ISIC2019_ONE_HOT[:-1]),
        source,
        "Expected the official ground truth header: image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK",
    )
    one_hot_cols = [c for c in ISIC2019_ONE_HOT if c in truth.columns]
    try:
        one_hot = truth[one_hot_cols].astype(float)
    except ValueError:
        raise CatalogueError(f"{source}: the class columns must hold 0/1 numbers") from None
    ones = one_hot.sum(axis=1)
    not_one = truth.loc[ones.ne(1.0), "image"].tolist()
    if not_one:
        raise CatalogueError(
            f"{source}: {describe_offenders(not_one)} rows do not have exactly one class set to 1"
        )
    labels = one_hot.idxmax(axis=1)
    unk = truth.loc[labels.eq("UNK"), "image"].tolist()
    if unk:
        raise CatalogueError(
            f"{source}: {describe_offenders(unk)} rows are labelled UNK, which is not a training "
            f"class; remove them (valid labels: {', '.join(CLASS_NAMES)})"
        )
    table = pd.DataFrame({"image": truth["image"], "label": labels})
    if metadata_csv is not None:
        meta = _read_csv(metadata_csv).rename(columns=PLAIN_ALIASES)
        _require_columns(meta, ("image",), str(metadata_csv), "Expected ISIC 2019 metadata.")
        keep = [c for c in ("image", "lesion_id", "age_approx", "sex", "anatom_site") if c in meta]
        table = table.merge(meta[keep].drop_duplicates("image"), on="image", how="left")
    return finalize_catalogue(table, image_dir, source=source, missing=missing)


def read_ham10000(
    metadata_csv: str | Path, image_dir: str | Path, missing: str = "error"
) -> pd.DataFrame:
    """HAM10000_metadata.csv: lesion_id,image_id,dx,dx_type,age,sex,localization."""
    source = str(metadata_csv)
    meta = _read_csv(metadata_csv)
    _require_columns(
        meta,
        ("lesion_id", "image_id", "dx"),
        source,
        "Expected the HAM10000 header: lesion_id,image_id,dx,dx_type,age,sex,localization",
    )
    dx = meta["dx"].astype(str).str.strip().str.lower()
    unknown = meta.loc[~dx.isin(HAM10000_DX), ["image_id", "dx"]]
    if len(unknown):
        offenders = [f"{r.image_id}={r.dx}" for r in unknown.itertuples()]
        raise CatalogueError(
            f"{source}: {describe_offenders(offenders)} rows have unknown dx codes; "
            f"valid codes are {', '.join(HAM10000_DX)}"
        )
    table = pd.DataFrame(
        {
            "image": meta["image_id"],
            "label": dx.map(HAM10000_DX),
            "lesion_id": meta["lesion_id"],
            "age_approx": meta.get("age"),
            "sex": meta.get("sex"),
            "anatom_site": meta.get("localization"),
        }
    )
    return finalize_catalogue(table, image_dir, source=source, missing=missing)


def detect_format(csv_path: str | Path) -> str:
    """'isic2019', 'ham10000' or 'plain', from the CSV header alone."""
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"catalogue CSV {path} does not exist")
    header = pd.read_csv(path, nrows=0).columns.str.strip().tolist()
    if {"image", "MEL", "NV"}.issubset(header):
        return "isic2019"
    if {"image_id", "dx", "lesion_id"}.issubset(header):
        return "ham10000"
    if {"image", "label"}.issubset(header):
        return "plain"
    raise CatalogueError(
        f"{path}: unrecognised header {header}. Supported: plain 'image,label,...', the ISIC 2019 "
        "ground truth 'image,MEL,NV,...', or HAM10000 'lesion_id,image_id,dx,...'"
    )


def read_catalogue(
    csv_path: str | Path,
    image_dir: str | Path,
    metadata_csv: str | Path | None = None,
    missing: str = "error",
) -> pd.DataFrame:
    """Read any supported source into a catalogue; the format is detected from the header."""
    fmt = detect_format(csv_path)
    if fmt == "isic2019":
        return read_isic2019(csv_path, image_dir, metadata_csv=metadata_csv, missing=missing)
    if metadata_csv is not None:
        raise CatalogueError(f"metadata_csv applies to the ISIC 2019 format only, not {fmt}")
    if fmt == "ham10000":
        return read_ham10000(csv_path, image_dir, missing=missing)
    return read_plain_csv(csv_path, image_dir, missing=missing)
