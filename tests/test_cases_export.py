"""jobs/export_cases.py: cases confirmed over the real HTTP API (the session's Serve) become a
plain catalogue that jobs/evaluate.py --split all, jobs/compare.py and the training reader take
as they are. SYNTHETIC lesions; the session's tiny checkpoints score them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import load_job

from dermanet.data.synthetic import draw_lesion

pytest_plugins = ["conftest_serve"]


def test_nothing_confirmed_is_a_clear_error(tmp_path: Path, capsys) -> None:
    from dermanet.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(make_engine(url))
    code = load_job("export_cases").main(
        ["--output", str(tmp_path / "c.csv"), "--images", str(tmp_path / "img"),
         "--database-url", url, "--data-dir", str(tmp_path)]
    )  # fmt: skip
    assert code == 2 and "record a diagnosis" in capsys.readouterr().err
    assert not (tmp_path / "c.csv").exists()
    absent = tmp_path / "elsewhere"
    code = load_job("export_cases").main(
        ["--output", str(tmp_path / "c.csv"), "--images", str(tmp_path / "img"),
         "--data-dir", str(absent)]
    )  # fmt: skip
    assert code == 2 and "no database at" in capsys.readouterr().err and not absent.exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_confirmed_cases_export_and_evaluate(
    serve_url: str, serve_account: SimpleNamespace, model_registry: Path, planting, tmp_path
) -> None:
    client = httpx.Client(base_url=serve_url, headers=serve_account.headers, timeout=120)
    sent: dict[int, bytes] = {}  # image_id -> bytes uploaded

    def case(patient: str, lesion: str, site: str | None, labels: list[str], n: int) -> int:
        made = client.post("/v1/cases", json={"patient": patient, "lesion": lesion, "site": site})
        assert made.status_code == 201, made.text
        case_id = made.json()["case_id"]
        for i in range(n):
            pixels, _ = draw_lesion("MEL", 128, np.random.default_rng(case_id * 10 + i))
            fmt, name = ("PNG", f"v{i}.png") if i % 2 else ("JPEG", f"v{i}.jpg")
            data = planting.encode(pixels, fmt)
            up = client.post(
                f"/v1/cases/{case_id}/images",
                files={"file": (name, data)},
                data={"taken_at": f"2026-0{i + 1}-01"},
            )
            assert up.status_code == 201, up.text
            sent[up.json()["image_id"]] = data
        for label in labels:
            body = {"label": label, "method": "histopathology", "note": ""}
            assert client.post(f"/v1/cases/{case_id}/diagnosis", json=body).status_code == 201
        return case_id

    first = case("EXP-1", "L1", "back", ["NV", "MEL"], 2)  # the latest diagnosis counts
    second = case("EXP-2", "L1", None, ["BCC"], 1)
    third = case("EXP-3", "L2", "face", ["NV"], 3)
    unconfirmed = case("EXP-4", "L1", None, [], 1)
    deleted = case("EXP-5", "L1", None, ["SCC"], 1)
    assert client.delete(f"/v1/cases/{deleted}").status_code == 200
    dropped = client.get(f"/v1/cases/{third}").json()["images"][0]["image_id"]
    assert client.delete(f"/v1/cases/{third}/images/{dropped}").status_code == 200
    client.close()

    csv, images = tmp_path / "confirmed.csv", tmp_path / "confirmed"
    code = load_job("export_cases").main(
        ["--output", str(csv), "--images", str(images), "--database-url",
         serve_account.database_url, "--data-dir", str(serve_account.data_dir)]
    )  # fmt: skip
    assert code == 0
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    mine = table[table["lesion_id"].isin([f"case{c}" for c in (first, second, third)])]
    assert len(mine) == 2 + 1 + 2  # live images of confirmed, live cases only
    assert not table["lesion_id"].isin([f"case{unconfirmed}", f"case{deleted}"]).any()
    by_case = mine.groupby("lesion_id")["label"].unique().to_dict()
    assert by_case == {f"case{first}": ["MEL"], f"case{second}": ["BCC"], f"case{third}": ["NV"]}
    assert set(mine["method"]) == {"histopathology"} and "EXP-1" not in csv.read_text()
    for row in mine.itertuples():
        image_id = int(row.image.rsplit("image", 1)[1])
        assert image_id != dropped
        (path,) = images.glob(f"{row.image}.*")
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(sent[image_id]).digest()
        assert row.model_sha256 and row.gate_accepted in ("true", "false")

    from dermanet.data.sources import DataLocation, load_catalogue

    read = load_catalogue(DataLocation(csv=str(csv), images=str(images)))  # what train.py reads
    assert len(read) == len(table) and set(read["split"]) <= {"train", "val", "test"}

    reports = {}
    for model in ("default", "trusted"):
        reports[model] = tmp_path / f"eval-{model}"
        code = load_job("evaluate").main(
            ["--checkpoint", str(model_registry / f"{model}.pt"), "--csv", str(csv),
             "--images", str(images), "--split", "all", "--output", str(reports[model])]
        )  # fmt: skip
        assert code == 0
    report = json.loads((reports["default"] / "report.json").read_text())
    assert report["images"] == len(table)
    out = tmp_path / "compare.json"
    code = load_job("compare").main(
        [str(reports["default"]), str(reports["trusted"]), "--groups", str(csv),
         "--group-by", "method", "--resamples", "100", "--output", str(out)]
    )  # fmt: skip
    assert code == 0 and out.is_file()
