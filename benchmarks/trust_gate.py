"""Know when not to answer, measured: quality checks, OOD methods, the gate, conformal sets.

    nice -n 19 .venv/bin/python benchmarks/trust_gate.py --write-docs docs/trust.md

With a checkpoint (default weights/default.pt) and derm-sample (split with assign_splits seed
0): fits every OOD method as `jobs/evaluate.py --export` does (one detector on the plain
train and val views and one on the same images framed by a dermatoscope's round vignette;
threshold on val at <= 3 % false refusal for EVERY class), the default with both views in one
reference, the default with a third view of the same images with hair, ink and rulers drawn
on (`artefact_image`), the default with the served second look (each image it refuses on the
OOD score alone scored again with hair and ink painted out: the shipped gate), the pooled
gate it replaces (plain train features, 5 % of all val) as
the baseline, and the conformal methods on val probabilities (the served logits / the
checkpoint's temperature). Reports on the TEST split and on the OOD set (built by
python -m tools.build_ood_set when --ood has none):
- quality-check trip rates per check on val (the thresholds' budget: <= 2 %), test and OOD;
- per OOD method: AUROC, refusals of test, of its worst class, of the OOD set (per kind of
  picture), of dermatoscope artefacts (the real ones listed in
  benchmarks/dermatoscope_artefacts.csv and HAM10000 test images given a round vignette);
- per class and per image source: refusals and, on accepted images, set coverage and size,
  on val and test, and leaving each image source out of the fit (gate and sets) and scoring
  it (the closest stand-in for a new clinic);
- per conformal method: coverage, set size, per-class coverage of accepted test images, and
  the lowest per-class coverage on a left-out source;
- costs against one model forward (baseline): the quality checks, and the OOD score of one
  image with the baseline and the default statistics, medians of runs.
Features are cached in --cache (keyed by the checkpoint's hash); a retrained model re-fits
everything with this one command. --limit N runs a tiny check on N images per split.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from dermanet.classes import CLASS_NAMES
from dermanet.data import read_plain_csv
from dermanet.data.splits import assign_splits
from dermanet.eval.trust_eval import VIGNETTE_FRACTIONS, read_ood_manifest, vignette_image
from dermanet.inference import Predictor, load_checkpoint
from dermanet.inference.features import extract_features, iter_images
from dermanet.paths import PROJECT_ROOT, sample_dir
from dermanet.trust import (
    CHECKS,
    DEFAULT_CONFORMAL_MARGIN,
    DEFAULT_CONFORMAL_METHOD,
    DEFAULT_OOD_FPR,
    DEFAULT_OOD_METHOD,
    OOD_METHODS,
    assess_quality,
    calibrated_probabilities,
    fit_conformal,
    fit_ood_detector,
    gate_scores,
    ood_report,
    ood_scores,
    prediction_sets,
    refusal_report,
    set_report,
    stats_nbytes,
    with_second_look,
)
from tools.dermatoscope_artefacts import artefact_image
from tools.ood_set import build_ood_set

log = logging.getLogger("trust_gate")
START, END = "<!-- trust_gate results: start -->", "<!-- trust_gate results: end -->"
TINY_TRAIN_ROWS = 240  # --limit's floor for the train split: knn_k (50) after leaving a source out
TEST_FRACTIONS = (0.9, 1.0, 1.1, 1.2)
ARTEFACTS = Path(__file__).resolve().parent / "dermatoscope_artefacts.csv"
BASELINE = "mahalanobis_knn, pooled 5 %"  # the gate fitted before per-class thresholds
POOLED_VIEWS = f"{DEFAULT_OOD_METHOD}, views in one reference"  # not one detector per view
ARTEFACT_VIEW = f"{DEFAULT_OOD_METHOD}, with an artefact view"  # a third reference view
SECOND_LOOK = f"{DEFAULT_OOD_METHOD}, second look (served)"  # refused images cleaned, rescored
COMPARED = (BASELINE, POOLED_VIEWS, DEFAULT_OOD_METHOD, ARTEFACT_VIEW, SECOND_LOOK)
PLAIN_SETS = {"method": "mondrian", "delta": None, "margin": 0.0}  # the baseline's sets
DEFAULT_SETS = f"{DEFAULT_CONFORMAL_METHOD}, margin {DEFAULT_CONFORMAL_MARGIN} (default)"
SET_VARIANTS = {  # label: fit_conformal options, all at the nominal 90 %
    DEFAULT_SETS: {},
    "mondrian_aps": {"margin": 0.0},
    "mondrian": PLAIN_SETS,
    "mondrian, margin 0.05": {**PLAIN_SETS, "margin": 0.05},
    "mondrian, delta 0.1": {**PLAIN_SETS, "delta": 0.1},
    "lac": {"method": "lac", "margin": 0.0},
    "aps": {"method": "aps", "margin": 0.0},
}
LOSO_MIN_IMAGES = 15  # a left-out class's coverage counts in the comparison from this many


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        default=str(PROJECT_ROOT / "weights" / "default.pt"),
        help="model whose features the OOD methods are fitted on",
    )
    p.add_argument(
        "--derm-sample",
        default=str(sample_dir()),
        help="derm-sample folder (metadata.csv + images/); env DERMANET_SAMPLE_DIR",
    )
    p.add_argument(
        "--ood",
        default=str(PROJECT_ROOT / "outputs" / "trust-ood"),
        help="OOD set (python -m tools.build_ood_set; built here if missing)",
    )
    p.add_argument(
        "--cache",
        default=str(PROJECT_ROOT / "outputs" / "trust-cache"),
        help="feature cache folder (per checkpoint hash)",
    )
    p.add_argument("--limit", type=int, help="tiny check: at most N images per split")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--write-docs", help="replace the results section of this Markdown file")
    return p.parse_args(argv)


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cached_features(
    predictor: Predictor,
    paths: list[str],
    name: str,
    cache: Path,
    batch_size: int,
    view: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of `paths` decoded as the server does (then `view(i, image)` when
    given: `name` must then say which view), from the cache when the same files were seen."""
    key = hashlib.sha256("\n".join(["served-decode", *paths]).encode()).hexdigest()[:12]
    target = cache / f"{name}-{len(paths)}-{key}.npz"
    if target.is_file():
        data = np.load(target)
        return data["features"], data["logits"]
    start = time.perf_counter()
    images = iter_images(paths, predictor.decode)
    if view is not None:
        images = (view(i, image) for i, image in enumerate(images))
    features, logits = extract_features(predictor, images, batch_size)
    log.info("%s: %d images in %.0f s", name, len(paths), time.perf_counter() - start)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(target, features=features, logits=logits)
    return features, logits


def framed_view(seed: int | None) -> Callable[[int, np.ndarray], np.ndarray]:
    """Round vignettes: seeded sizes in the export's range (seed), or the test's fixed cycle
    of 0.9/1.0/1.1/1.2 x the short side (None: 0.9 crops into most lesions' surroundings)."""
    low, high = VIGNETTE_FRACTIONS
    fractions = (
        np.random.default_rng(seed).uniform(low, high, 100_000) if seed is not None else None
    )
    return lambda i, image: vignette_image(
        image, fractions[i] if fractions is not None else TEST_FRACTIONS[i % len(TEST_FRACTIONS)]
    )


def artefact_view(seed: int) -> Callable[[int, np.ndarray], np.ndarray]:
    """Hair, ink and rulers drawn on each image (`artefact_image`), seeded per image."""
    return lambda i, image: artefact_image(image, seed * 1_000_000 + i)


def quality_table(
    predictor: Predictor, paths_by_set: dict[str, list[str]]
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Share of images tripping each check (and any), per set; plus the per-image pass flags."""
    rows, passed = {}, {}
    for name, paths in paths_by_set.items():
        reports = [predictor.assess(image) for image in iter_images(paths, predictor.decode)]
        passed[name] = np.array([r.ok for r in reports])
        rates = {c: np.mean([c in r.failed for r in reports]) for c in CHECKS}
        rows[name] = {**rates, "any check": 1 - passed[name].mean(), "images": len(reports)}
    return pd.DataFrame(rows), passed


def median_ms(fn: Callable[[], object], runs: int, repeats: int) -> float:
    """Median over `runs` of the mean ms of `repeats` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats * 1000)
    return float(np.median(times))


def quality_cost(predictor: Predictor, runs: int = 7, repeats: int = 20) -> dict[str, float]:
    """Median ms of the quality checks on a 600x450 image vs one model forward (baseline)."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8), (0, 0), 2)
    x = predictor.to_tensor([image])

    with torch.inference_mode():
        forward = median_ms(lambda: predictor.model(x), runs, repeats)
    quality = median_ms(lambda: assess_quality(image), runs, repeats)
    return {"quality_ms": quality, "forward_ms": forward, "ratio": quality / forward}


def pct(value: float) -> str:
    return f"{100 * value:.1f} %"


def table(frame: pd.DataFrame) -> str:
    """A Markdown table (pandas' to_markdown needs tabulate, not installed here)."""
    header = ["", *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index), *map(str, row.tolist())]) + " |")
    return "\n".join(lines)


def percent_table(frame: pd.DataFrame) -> str:
    """Markdown table with float cells as percentages."""
    return table(frame.map(lambda v: pct(v) if isinstance(v, float) else v))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    root, checkpoint = Path(args.derm_sample), Path(args.checkpoint)
    if not (root / "metadata.csv").is_file():
        print(f"error: derm-sample not found at {root} (--derm-sample)", file=sys.stderr)
        return 2
    catalogue = assign_splits(read_plain_csv(root / "metadata.csv", root / "images"), seed=0)
    splits = {}
    for split in ("train", "val", "test"):
        rows = catalogue.loc[catalogue["split"] == split].sort_values("image")
        if args.limit:
            n = max(args.limit, TINY_TRAIN_ROWS) if split == "train" else args.limit
            rows = rows.sample(n=min(n, len(rows)), random_state=0).sort_values("image")
        splits[split] = rows
    splits["framed"] = splits["test"].loc[splits["test"]["origin"] == "HAM10000"]
    ood_dir = Path(args.ood)
    if not (ood_dir / "manifest.csv").is_file():
        log.info("building the OOD set in %s", ood_dir)
        build_ood_set(ood_dir, derm_sample=root, seed=0)
    manifest = read_ood_manifest(ood_dir)
    if args.limit:
        manifest = manifest.groupby("kind").head(max(2, args.limit // 20)).reset_index(drop=True)
    kinds = manifest["kind"].to_numpy()

    loaded = load_checkpoint(checkpoint)
    predictor = Predictor(loaded, backend="auto")  # as served: ONNX Runtime on a CPU
    # the gate is fitted on the plain view's training features: the served views' logits are
    # not needed there (the train split's logits are that one view's)
    plain = Predictor(dataclasses.replace(loaded, tta="none"), backend="auto")
    cache = Path(args.cache) / file_hash(checkpoint)
    paths = {s: [str(p) for p in rows["path"]] for s, rows in splits.items()}
    feats, logits = {}, {}
    for split in ("train", "val", "test"):
        feats[split], logits[split] = cached_features(
            plain if split == "train" else predictor, paths[split], split, cache, args.batch_size
        )
    feats["train_framed"], logits["train_framed"] = cached_features(
        plain, paths["train"], "train-framed", cache, args.batch_size, framed_view(0)
    )
    feats["val_framed"], logits["val_framed"] = cached_features(
        plain, paths["val"], "val-framed", cache, args.batch_size, framed_view(1)
    )
    feats["train_artefacts"], logits["train_artefacts"] = cached_features(
        plain, paths["train"], "train-artefacts", cache, args.batch_size, artefact_view(0)
    )
    feats["val_artefacts"], logits["val_artefacts"] = cached_features(
        plain, paths["val"], "val-artefacts", cache, args.batch_size, artefact_view(1)
    )
    feats["framed"], logits["framed"] = cached_features(
        predictor, paths["framed"], "test-framed", cache, args.batch_size, framed_view(None)
    )
    feats["ood"], logits["ood"] = cached_features(
        predictor, list(manifest["file"]), "ood", cache, args.batch_size
    )
    labels = {s: rows["label"].map(CLASS_NAMES.index).to_numpy() for s, rows in splits.items()}
    origins = {s: rows["origin"].astype(str).to_numpy() for s, rows in splits.items()}

    quality, passed = quality_table(
        predictor, {"val": paths["val"], "test": paths["test"], "OOD set": list(manifest["file"])}
    )
    passed["ood"] = passed.pop("OOD set")
    view = framed_view(None)
    framed_images = enumerate(iter_images(paths["framed"], predictor.decode))
    passed["framed"] = np.array([predictor.assess(view(i, im)).ok for i, im in framed_images])
    cost = quality_cost(predictor)
    artefacts = pd.read_csv(ARTEFACTS)

    data = {s: (feats[s], logits[s], labels.get(s), origins.get(s), passed.get(s)) for s in feats}
    reference = (feats["train"], labels["train"], origins["train"])
    views = [
        (feats[f"train_{v}"], feats[f"val_{v}"], logits[f"val_{v}"])
        for v in ("framed", "artefacts")
    ]
    fits = {
        method: fit_ood_detector(
            feats["train"],
            labels["train"],
            feats["val"],
            logits["val"],
            method,
            val_labels=labels["val"],
            views=views[:1],
        )
        for method in OOD_METHODS
    }
    fits[ARTEFACT_VIEW] = fit_ood_detector(
        feats["train"],
        labels["train"],
        feats["val"],
        logits["val"],
        val_labels=labels["val"],
        views=views,
    )
    fits[POOLED_VIEWS] = fit_ood_detector(
        np.concatenate([feats["train"], feats["train_framed"]]),
        np.concatenate([labels["train"], labels["train"]]),
        feats["val"],
        logits["val"],
        val_labels=labels["val"],
    )
    fits[BASELINE] = fit_ood_detector(
        feats["train"], labels["train"], feats["val"], logits["val"], "mahalanobis_knn", 0.05
    )
    refused = {
        m: {s: refused_with(stats, data[s]) for s in ("val", "test", "framed", "ood")}
        for m, stats in fits.items()
    }
    fits[SECOND_LOOK] = fits[DEFAULT_OOD_METHOD]
    refused[SECOND_LOOK] = {}
    paths["ood"] = list(manifest["file"])
    for split in ("val", "test", "framed", "ood"):
        refused[SECOND_LOOK][split] = refused_after_second_look(
            predictor, fits[SECOND_LOOK], data[split], paths[split],
            framed_view(None) if split == "framed" else None,
        )  # fmt: skip
    ood_rows, per_kind = {}, {}
    for method, stats in fits.items():
        r = refused[method]
        alone = ood_report(
            ood_scores(stats, feats["test"], logits["test"]),
            ood_scores(stats, feats["ood"], logits["ood"]),
            stats["threshold"],
        )
        _, (real, listed) = artefact_refusals(r, splits, artefacts)
        ood_rows[method] = {
            "OOD AUROC": f"{alone['auroc']:.3f}",
            "val refused": pct(r["val"].mean()),
            "worst val class": worst(r["val"], labels["val"]),
            "test refused": pct(r["test"].mean()),
            "worst test class": worst(r["test"], labels["test"]),
            "framed test": pct(r["framed"].mean()),
            "real artefacts": f"{pct(real / listed)} ({real} of {listed})",
            "OOD set refused": pct(r["ood"].mean()),
            "photos refused": pct(r["ood"][kinds == "photo"].mean()),
            "stats size": f"{stats_nbytes(stats) / 1024:.0f} KB",
        }
        per_kind[method] = pd.Series(r["ood"]).groupby(kinds).mean()
    kind_table = pd.DataFrame(
        {
            "images": manifest["kind"].value_counts(),
            "quality checks": pd.Series(~passed["ood"]).groupby(kinds).mean(),
            **{f"gate ({m})": per_kind[m] for m in COMPARED},
        }
    )
    artefact_table = pd.DataFrame(
        {m: artefact_refusals(refused[m], splits, artefacts)[0] for m in COMPARED}
    ).astype(object)
    artefact_table.insert(0, "images", artefacts.groupby("kind").size())
    cycle = np.arange(len(refused[BASELINE]["framed"])) % len(TEST_FRACTIONS)
    for j, fraction in enumerate(TEST_FRACTIONS):
        artefact_table.loc[f"vignette {fraction}x (HAM10000 test)"] = [
            int((cycle == j).sum()),
            *(refused[m]["framed"][cycle == j].mean() for m in COMPARED),
        ]

    temperature = loaded.temperature
    before = {"refused": BASELINE, "sets": PLAIN_SETS}
    after = {"refused": SECOND_LOOK, "sets": {}}
    class_tables, source_tables = {}, {}
    for name, gate in (("before", before), ("after", after)):
        conformal = fit_conformal(
            calibrated_probabilities(logits["val"], temperature),
            labels["val"],
            0.9,
            **gate["sets"],
        )
        for split in ("val", "test"):
            sets = prediction_sets(calibrated_probabilities(logits[split], temperature), conformal)
            rep = refusal_report(
                refused[gate["refused"]][split],
                labels[split],
                CLASS_NAMES,
                sets,
                origins[split],
            )
            class_tables[f"{split} {name}"] = rep["per_class"]
            source_tables[f"{split} {name}"] = rep["per_source"]
    loso, held_out = leave_source_out(data, reference, views[:1], temperature)

    set_rows, class_rows = {}, {}
    accepted = ~refused[SECOND_LOOK]["test"]
    for key, options in SET_VARIANTS.items():
        stats = fit_conformal(
            calibrated_probabilities(logits["val"], temperature), labels["val"], 0.9, **options
        )
        sets = prediction_sets(
            calibrated_probabilities(logits["test"][accepted], temperature), stats
        )
        report = set_report(sets, labels["test"][accepted], CLASS_NAMES)
        per_class = {k: v["coverage"] for k, v in report["per_class"].items()}
        lowest = min(per_class, key=lambda c: np.nan_to_num(per_class[c], nan=np.inf))
        left_out = held_out_coverage(held_out, temperature, options)
        worst_left_out = min(left_out, key=left_out.get)
        set_rows[key] = {
            "coverage": f"{report['coverage']:.3f}",
            "mean set size": f"{report['mean_size']:.2f}",
            "singletons": pct(report["singletons"]),
            "lowest class coverage": f"{lowest} {per_class[lowest]:.2f}",
            "left-out source: lowest class": f"{worst_left_out} {left_out[worst_left_out]:.2f}",
        }
        class_rows[key] = {k: f"{v:.2f}" for k, v in per_class.items()}
    class_rows["accepted test images"] = {
        c: int((labels["test"][accepted] == i).sum()) for i, c in enumerate(CLASS_NAMES)
    }
    class_rows["val images"] = {
        c: int((labels["val"] == i).sum()) for i, c in enumerate(CLASS_NAMES)
    }
    timing = score_cost(
        predictor,
        {m: fits[m] for m in COMPARED if m != SECOND_LOOK},
        feats["test"],
        logits["test"],
    )
    timing.update(second_look_cost(loaded, paths["test"]))

    tables = dict(quality=quality, cost=cost, ood_rows=ood_rows, kind_table=kind_table,
                  artefact_table=artefact_table, class_tables=class_tables,
                  source_tables=source_tables, loso=loso, set_rows=set_rows,
                  class_rows=class_rows, timing=timing)  # fmt: skip
    text = render(args, loaded, splits, manifest, tables)
    print(text)
    if args.write_docs:
        write_section(Path(args.write_docs), text)
        print(f"results written to {args.write_docs}")
    return 0


def second_look_cost(loaded, paths: list[str], n: int = 2000, runs: int = 3) -> dict[str, float]:
    """Mean ms an image of `predict_batch` (batches of 32) over `n` seeded test images (the
    first look refuses about 1 %, so fewer would time a handful of second looks), with
    the shipped statistics and with the same without `second_look_threshold`, alternated,
    medians of `runs`: what the second look adds to classifying real dermoscopy."""
    if "second_look_threshold" not in (loaded.trust.get("ood") or {}):
        return {}
    predictor = Predictor(loaded, backend="auto")
    chosen = np.random.default_rng(0).permutation(len(paths))[:n]
    images = list(iter_images([paths[i] for i in sorted(chosen)], predictor.decode))

    def classify(batch: list[np.ndarray], second_look: bool) -> list:
        """`predict_batch`; without the decoded images the first look decides alone."""
        prepared = [predictor.preprocessing.prepare(image) for image in batch]
        if not second_look:
            prepared = [dataclasses.replace(p, decoded=None) for p in prepared]
        return predictor.predict_prepared(prepared)

    times: dict[str, list[float]] = {"with second look": [], "first look only": []}
    answers: dict[str, list] = {}
    for _ in range(runs):
        for name in times:
            start = time.perf_counter()
            looks = name == "with second look"
            answers[name] = [p for i in range(0, len(images), 32)
                             for p in classify(images[i : i + 32], looks)]  # fmt: skip
            times[name].append((time.perf_counter() - start) / len(images) * 1000)
    result = {name: float(np.median(values)) for name, values in times.items()}
    result["first look refused"] = float(sum(not p.accepted for p in answers["first look only"]))
    result["second looks"] = float(sum("checks" in p.gate for p in answers["with second look"]))
    result["test images timed"] = float(len(images))
    return result


def refused_with(stats: dict, split: tuple) -> np.ndarray:
    """The gate's refusals: a quality check failed, or the OOD score is above the threshold."""
    features, logits, _, _, passed = split
    return gate_scores(passed, ood_scores(stats, features, logits)) > stats["threshold"]


def refused_after_second_look(
    predictor: Predictor,
    stats: dict,
    split: tuple,
    paths: list[str],
    view: Callable[[int, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """The served gate's refusals: as `refused_with`, then each image refused on its OOD score
    alone is decoded again (through `view` when given) and cleaned and run as the server does
    (`Predictor.cleaned_forward`), scored against `stats`: accepted when within its
    `second_look_threshold`."""
    features, logits, _, _, passed = split
    gate = gate_scores(passed, ood_scores(stats, features, logits))
    rows = np.flatnonzero(np.isfinite(gate) & (gate > stats["threshold"]))
    second = np.full(len(gate), np.nan)
    if len(rows):
        images = iter_images([paths[i] for i in rows], predictor.decode)
        if view is not None:
            images = (view(int(row), image) for row, image in zip(rows, images, strict=True))
        logits, features = predictor.cleaned_forward(list(images))
        second[rows] = ood_scores(stats, features, logits)
    threshold = float(stats["threshold"])
    return with_second_look(gate, threshold, second, stats["second_look_threshold"]) > threshold


def worst(refused: np.ndarray, labels: np.ndarray) -> str:
    """The class refused most, and how often."""
    rates = {
        c: refused[labels == i].mean() for i, c in enumerate(CLASS_NAMES) if (labels == i).any()
    }
    name = max(rates, key=rates.get)
    return f"{name} {pct(rates[name])}"


def artefact_refusals(
    refused: dict, splits: dict, artefacts: pd.DataFrame
) -> tuple[pd.Series, tuple[int, int]]:
    """Share refused of the real artefact images (val and test) per kind, and (refused,
    listed) images apart from stickers, each image once (one can show several kinds)."""
    ids = np.concatenate([splits["val"]["image"], splits["test"]["image"]])
    gate = pd.Series(np.concatenate([refused["val"], refused["test"]]), index=ids)
    listed = artefacts.loc[artefacts["image"].isin(gate.index)]
    optics = listed.loc[listed["kind"] != "sticker", "image"].drop_duplicates()
    per_kind = gate.loc[listed["image"]].groupby(listed["kind"].to_numpy()).mean()
    return per_kind, (int(gate.loc[optics].sum()), len(optics))


def leave_source_out(
    data: dict, reference: tuple, reference_views: list[tuple], temperature: float
) -> tuple[dict, dict]:
    """Per held-out image source: gate and sets fitted without it (train and val of the other
    sources, in every view of `reference_views`: (train features, val features, val logits)),
    refusals and accepted-image coverage on its val + test images.
    Classes the other sources lack cannot be fitted and are left out. Also returns, per
    source, the calibration (the other sources' val logits and labels) and the held-out
    images the default gate accepts (logits, labels), for comparing set methods."""
    features = np.concatenate([data["val"][0], data["test"][0]])
    logits = np.concatenate([data["val"][1], data["test"][1]])
    labels = np.concatenate([data["val"][2], data["test"][2]])
    origins = np.concatenate([data["val"][3], data["test"][3]])
    passed = np.concatenate([data["val"][4], data["test"][4]])
    val_f, val_l, val_y, val_o = data["val"][:4]
    train_f, train_y, train_o = reference
    tables, held_out = {}, {}
    for source in sorted(set(origins)):
        keep_ref, keep_val = train_o != source, val_o != source
        fitted_classes = np.intersect1d(train_y[keep_ref], val_y[keep_val])
        rows = (origins == source) & np.isin(labels, fitted_classes)
        if not rows.any():
            continue
        columns = {}
        kept = [(t[keep_ref], v[keep_val], vl[keep_val]) for t, v, vl in reference_views]
        for name, method, fpr, sets_options, views in (
            ("before", "mahalanobis_knn", 0.05, PLAIN_SETS, ()),
            ("after", DEFAULT_OOD_METHOD, DEFAULT_OOD_FPR, {}, kept),
        ):
            val_labels = val_y[keep_val] if name == "after" else None
            stats = fit_ood_detector(
                train_f[keep_ref],
                train_y[keep_ref],
                val_f[keep_val],
                val_l[keep_val],
                method,
                fpr,
                val_labels=val_labels,
                views=views,
            )
            probs = calibrated_probabilities(val_l[keep_val], temperature)
            conformal = fit_conformal(probs, val_y[keep_val], 0.9, **sets_options)
            split = (features[rows], logits[rows], labels[rows], origins[rows], passed[rows])
            sets = prediction_sets(calibrated_probabilities(logits[rows], temperature), conformal)
            refused = refused_with(stats, split)
            rep = refusal_report(refused, labels[rows], CLASS_NAMES, sets)
            columns[name] = rep["per_class"]
        tables[source] = columns
        held_out[source] = {
            "calibration": (val_l[keep_val], val_y[keep_val]),
            "accepted": (logits[rows][~refused], labels[rows][~refused]),
        }
    return tables, held_out


def held_out_coverage(held_out: dict, temperature: float, options: dict) -> dict[str, float]:
    """Per left-out source and class (with >= LOSO_MIN_IMAGES accepted images): coverage of
    sets fitted with `options` on the other sources' val images."""
    coverage = {}
    for source, held in held_out.items():
        logits, labels = held["calibration"]
        stats = fit_conformal(calibrated_probabilities(logits, temperature), labels, 0.9, **options)
        logits, labels = held["accepted"]
        sets = prediction_sets(calibrated_probabilities(logits, temperature), stats)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            if len(members) >= LOSO_MIN_IMAGES:
                hits = np.mean([c in sets[i] for i in members])
                coverage[f"{CLASS_NAMES[c]} ({source})"] = float(hits)
    return coverage


def score_cost(
    predictor: Predictor,
    fits: dict,
    features: np.ndarray,
    logits: np.ndarray,
    runs: int = 7,
    repeats: int = 50,
) -> dict[str, float]:
    """Median ms of one image's OOD score per statistics vs one model forward (baseline), and
    of one whole served answer (`predict_batch`: quality checks, the served views' forward,
    the shipped OOD score, the set), which is /v1/classify's work apart from HTTP. The image
    scored is the first of `features` that every statistics accept (as most uploads are); the
    default's cost for the first the plain view refuses (every view scored) comes as "every
    view"."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8), (0, 0), 2)
    x = predictor.to_tensor([image])

    with torch.inference_mode():
        result = {"forward": median_ms(lambda: predictor.model(x), runs, repeats)}
    # the first look only (no decoded image kept): what an accepted upload costs
    result["served"] = median_ms(
        lambda: predictor.predict_prepared(
            [dataclasses.replace(predictor.preprocessing.prepare(image), decoded=None)]
        ),
        runs,
        10,
    )
    # what an image the gate refuses costs on top: cleaning it, the plain view's forward, score
    result["second look"] = median_ms(lambda: predictor.cleaned_ood_scores([image]), runs, 10)
    accepted = np.all([ood_scores(s, features, logits) <= s["threshold"] for s in fits.values()], 0)
    default = fits[DEFAULT_OOD_METHOD]
    first_view = default.get("views", [default])[0]
    refused = ood_scores(first_view, features, logits) > first_view["threshold"]
    rows = {name: np.flatnonzero(accepted)[:1] for name in fits}
    rows["every view"] = np.flatnonzero(refused)[:1]
    for name, row in rows.items():
        stats = fits.get(name, default)
        ood_scores(stats, features[row], logits[row])  # first call: converts the stored bank
        result[name] = median_ms(
            lambda s=stats, r=row: ood_scores(s, features[r], logits[r]), runs, repeats
        )
    return result


def render(args, loaded, splits, manifest, tables: dict) -> str:
    """The Markdown results section."""
    t, cost = tables, tables["cost"]
    command = "nice -n 19 .venv/bin/python benchmarks/trust_gate.py " + " ".join(sys.argv[1:])
    quality_frame = t["quality"].astype(object)
    quality_frame.loc["images"] = t["quality"].loc["images"].astype(int).tolist()
    lines = [
        f"Command: `{command.strip()}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {platform.node() or '?'}, "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}  ",
        f"Model: `{Path(args.checkpoint).name}` ({loaded.img_size} px, feature dim "
        f"{loaded.config.feature_dim}, temperature {loaded.temperature:.3f}); derm-sample "
        f"train {len(splits['train'])} / val {len(splits['val'])} / test {len(splits['test'])}; "
        f"OOD set {len(manifest)} images ({args.ood}). *Baseline* = `{BASELINE}`: "
        "`mahalanobis_knn` fitted on plain train features with one threshold at 5 % of all val "
        "images, and Mondrian sets without a margin (`mondrian`).",
        "",
        "**Quality checks**: share of images tripping each check (a picture can trip several).",
        "",
        percent_table(quality_frame),
        "",
        f"Cost on a 600x450 image: quality checks {cost['quality_ms']:.2f} ms vs one model "
        f"forward {cost['forward_ms']:.2f} ms (baseline, batch 1) = {cost['ratio']:.2f}x; OOD "
        "score of one image: "
        + ", ".join(f"`{m}` {v:.2f} ms" for m, v in t["timing"].items() if m in COMPARED)
        + f" vs the forward {t['timing']['forward']:.2f} ms (medians of 7 runs): the default "
        f"score costs {pct(t['timing'][DEFAULT_OOD_METHOD] / t['timing']['forward'])} of one "
        f"forward, {pct(t['timing'][DEFAULT_OOD_METHOD] / t['timing']['served'])} of one served "
        f"answer ({t['timing']['served']:.2f} ms: quality checks, the "
        f"{loaded.tta or 'plain'} views' forward, OOD score and set). An image the plain view "
        f"refuses is scored against every view: {t['timing']['every view']:.2f} ms; one the gate "
        f"refuses on its OOD score gets the second look (cleaning, the plain view's forward "
        f"and the score again): {t['timing']['second look']:.2f} ms more. Classifying "
        f"{t['timing']['test images timed']:.0f} test images (batches of 32, medians of 3): "
        f"{t['timing']['with second look']:.2f} ms an image with the second look (the "
        f"first look refuses {t['timing']['first look refused']:.0f} of them, the second "
        f"lets {t['timing']['second looks']:.0f} of those in) against "
        f"{t['timing']['first look only']:.2f} ms without: "
        f"{t['timing']['with second look'] / t['timing']['first look only']:.3f}x.",
        "",
        "**OOD methods** (one detector on plain train and val features and one on the same "
        "images framed by a round vignette, an image refused when both refuse it; *with an "
        "artefact view*: a third detector on the same images with hair, ink and rulers drawn "
        "on; *views in one reference*: the framed train features added to the plain ones in "
        "one detector; *second look (served)*: the default, and each image it refuses on the "
        "OOD score alone scored again with hair and ink marks painted out, accepted within "
        "the 95th percentile of val scores; "
        "threshold on val at <= 3 % false refusal for every class). Refusals by the "
        "gate (quality checks OR OOD score); *framed test*: HAM10000 test images given a round "
        "vignette of 0.9-1.2x the short side; *real artefacts*: the listed val/test images "
        "with rulers, hair, ink, gel bubbles, vignettes (stickers apart), each once.",
        "",
        table(pd.DataFrame(t["ood_rows"]).T),
        "",
        "**Refused per kind of picture** (OOD set):",
        "",
        percent_table(t["kind_table"]),
        "",
        "**Dermatoscope artefacts refused** (real images by kind; synthetic vignettes by size):",
        "",
        percent_table(t["artefact_table"]),
        "",
        "**Per class** (refused; set coverage and mean size on accepted images; 90 % sets):",
        "",
        refusal_markdown(t["class_tables"]),
        "",
        "**Per image source** (test):",
        "",
        refusal_markdown({k: v for k, v in t["source_tables"].items() if k.startswith("test")}),
        "",
        "**Leaving one image source out** (gate and sets fitted on the other sources, scored "
        "on the left-out source's val + test images; classes it shares with them; the gate's "
        "first look only, so refusals are at most these):",
        "",
    ]
    for source, columns in t["loso"].items():
        lines += [f"*{source}*", "", refusal_markdown(columns), ""]
    lines += [
        "**Conformal prediction sets** (90 % nominal level, fitted on val; on the test images "
        "the default gate accepts; *left-out source*: fitted without one image source and "
        f"scored on its accepted val + test images, classes with >= {LOSO_MIN_IMAGES} of them; "
        "*margin*: thresholds fitted at 90 % + margin):",
        "",
        table(pd.DataFrame(t["set_rows"]).T),
        "",
        "Per-class coverage (accepted test images):",
        "",
        table(pd.DataFrame(t["class_rows"]).T),
    ]
    return "\n".join(lines) + "\n"


def refusal_markdown(columns: dict[str, dict[str, dict]]) -> str:
    """Rows: classes (or sources); per column group: refused, coverage, set size."""
    frame = {}
    for name, rows in columns.items():
        for row, values in rows.items():
            if not values["n"]:
                continue
            frame.setdefault(
                row, {"images": values["n"]} if "images" not in frame.get(row, {}) else frame[row]
            )
            frame[row][f"{name}: refused"] = pct(values["refused"])
            frame[row][f"{name}: coverage"] = f"{values['coverage']:.2f}"
            frame[row][f"{name}: set size"] = f"{values['mean_size']:.2f}"
    return table(pd.DataFrame(frame).T)


def write_section(path: Path, text: str) -> None:
    """Replace the text between the result markers (the hand-written rest stays)."""
    doc = path.read_text() if path.is_file() else f"{START}\n{END}\n"
    if START not in doc or END not in doc:
        doc += f"\n{START}\n{END}\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    path.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", doc))


if __name__ == "__main__":
    sys.exit(main())
