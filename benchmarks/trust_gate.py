"""Know when not to answer, measured: quality checks, OOD methods, the gate, conformal sets.

    nice -n 19 .venv/bin/python benchmarks/trust_gate.py --write-docs docs/trust.md

With a checkpoint (default weights/default.pt) and derm-sample (split with assign_splits seed
0): fits every OOD method on the train split's features with the threshold on val (false
rejection <= 5 %), and every conformal method on val probabilities (logits / the checkpoint's
temperature, no TTA: what Serve computes). Reports on the TEST split and on the OOD set
(built by python -m tools.build_ood_set when --ood has none):
- quality-check trip rates per check on val (the thresholds' budget: <= 2 %), test and OOD;
- per OOD method: AUROC, share of OOD and of test rejected by the OOD score alone and by the
  GATE (quality checks OR OOD score), per kind of picture, and the statistics' size;
- per conformal method: test coverage (aim 0.88-0.92), mean set size, per-class coverage;
- the cost of the quality checks against one model forward (baseline), medians of runs.
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
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from dermanet.classes import CLASS_NAMES
from dermanet.data import read_plain_csv
from dermanet.data.splits import assign_splits
from dermanet.eval.trust_eval import read_ood_manifest
from dermanet.inference import Predictor, load_checkpoint
from dermanet.inference.features import extract_features, iter_images
from dermanet.paths import PROJECT_ROOT, sample_dir
from dermanet.trust import (
    CHECKS,
    CONFORMAL_METHODS,
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
    set_report,
    stats_nbytes,
)
from tools.ood_set import build_ood_set

log = logging.getLogger("trust_gate")
START, END = "<!-- trust_gate results: start -->", "<!-- trust_gate results: end -->"
TINY_TRAIN_ROWS = 64  # --limit's floor for the train split: fit_ood's knn_k (50) needs more


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
    predictor: Predictor, paths: list[str], name: str, cache: Path, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Features and logits of `paths` decoded as the server does, from the cache when the
    same files were seen."""
    key = hashlib.sha256("\n".join(["served-decode", *paths]).encode()).hexdigest()[:12]
    target = cache / f"{name}-{len(paths)}-{key}.npz"
    if target.is_file():
        data = np.load(target)
        return data["features"], data["logits"]
    start = time.perf_counter()
    features, logits = extract_features(predictor, iter_images(paths, predictor.decode), batch_size)
    log.info("%s: %d images in %.0f s", name, len(paths), time.perf_counter() - start)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(target, features=features, logits=logits)
    return features, logits


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


def quality_cost(predictor: Predictor, runs: int = 7, repeats: int = 20) -> dict[str, float]:
    """Median ms of the quality checks on a 600x450 image vs one model forward (baseline)."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (450, 600, 3), dtype=np.uint8), (0, 0), 2)
    x = predictor.to_tensor([image])

    def median_ms(fn) -> float:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            times.append((time.perf_counter() - start) / repeats * 1000)
        return float(np.median(times))

    with torch.inference_mode():
        forward = median_ms(lambda: predictor.model(x))
    quality = median_ms(lambda: assess_quality(image))
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
    feats, logits = {}, {}
    for split, rows in splits.items():
        paths = [str(p) for p in rows["path"]]
        feats[split], logits[split] = cached_features(
            plain if split == "train" else predictor, paths, split, cache, args.batch_size
        )
    feats["ood"], logits["ood"] = cached_features(
        predictor, list(manifest["file"]), "ood", cache, args.batch_size
    )
    labels = {s: rows["label"].map(CLASS_NAMES.index).to_numpy() for s, rows in splits.items()}

    quality, passed = quality_table(
        predictor,
        {
            "val": [str(p) for p in splits["val"]["path"]],
            "test": [str(p) for p in splits["test"]["path"]],
            "OOD set": list(manifest["file"]),
        },
    )
    cost = quality_cost(predictor)

    ood_rows, per_kind = {}, {}
    for method in OOD_METHODS:
        stats = fit_ood_detector(
            feats["train"], labels["train"], feats["val"], logits["val"], method=method
        )
        test_s = ood_scores(stats, feats["test"], logits["test"])
        out_s = ood_scores(stats, feats["ood"], logits["ood"])
        alone = ood_report(test_s, out_s, stats["threshold"], kinds)
        gate = ood_report(
            gate_scores(passed["test"], test_s),
            gate_scores(passed["OOD set"], out_s),
            stats["threshold"],
            kinds,
        )
        ood_rows[method] = {
            "OOD AUROC": f"{alone['auroc']:.3f}",
            "val rejected": pct(stats["val_rejection_rate"]),
            "test rejected (OOD)": pct(alone["in_rejected"]),
            "OOD-set rejected (OOD)": pct(alone["out_rejected"]),
            "gate AUROC": f"{gate['auroc']:.3f}",
            "test rejected (gate)": pct(gate["in_rejected"]),
            "OOD-set rejected (gate)": pct(gate["out_rejected"]),
            "stats size": f"{stats_nbytes(stats) / 1024:.0f} KB",
        }
        per_kind[method] = {k: v["rejected"] for k, v in gate["per_kind"].items()}
        per_kind[method + " (OOD alone)"] = {k: v["rejected"] for k, v in alone["per_kind"].items()}
    temperature = loaded.temperature
    set_rows, class_rows = {}, {}
    for method in CONFORMAL_METHODS:
        stats = fit_conformal(
            calibrated_probabilities(logits["val"], temperature), labels["val"], 0.9, method
        )
        sets = prediction_sets(calibrated_probabilities(logits["test"], temperature), stats)
        report = set_report(sets, labels["test"], CLASS_NAMES)
        per_class = {k: v["coverage"] for k, v in report["per_class"].items()}
        set_rows[method] = {
            "test coverage": f"{report['coverage']:.3f}",
            "mean set size": f"{report['mean_size']:.2f}",
            "singletons": pct(report["singletons"]),
            "lowest class coverage": f"{np.nanmin(list(per_class.values())):.2f}",
        }
        class_rows[method] = {k: f"{v:.2f}" for k, v in per_class.items()}
    class_rows["test images"] = {
        c: int((labels["test"] == i).sum()) for i, c in enumerate(CLASS_NAMES)
    }
    class_rows["val images"] = {
        c: int((labels["val"] == i).sum()) for i, c in enumerate(CLASS_NAMES)
    }

    kind_table = pd.DataFrame(
        {
            "images": manifest["kind"].value_counts(),
            "quality checks": pd.Series(~passed["OOD set"]).groupby(kinds).mean(),
            **{
                f"gate ({m})": pd.Series(per_kind[m])
                for m in (DEFAULT_OOD_METHOD, "mahalanobis", "combined", "mahalanobis_knn")
            },
            f"{DEFAULT_OOD_METHOD} alone": pd.Series(per_kind[DEFAULT_OOD_METHOD + " (OOD alone)"]),
        }
    )
    text = render(args, loaded, splits, manifest, quality, cost, ood_rows, kind_table,
                  set_rows, class_rows)  # fmt: skip
    print(text)
    if args.write_docs:
        write_section(Path(args.write_docs), text)
        print(f"results written to {args.write_docs}")
    return 0


def render(args, loaded, splits, manifest, quality, cost, ood_rows, kind_table, set_rows,
           class_rows) -> str:  # fmt: skip
    command = "nice -n 19 .venv/bin/python benchmarks/trust_gate.py " + " ".join(sys.argv[1:])
    quality_frame = quality.astype(object)
    quality_frame.loc["images"] = quality.loc["images"].astype(int).tolist()
    lines = [
        f"Command: `{command.strip()}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {platform.node() or '?'}, "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}  ",
        f"Model: `{Path(args.checkpoint).name}` ({loaded.img_size} px, feature dim "
        f"{loaded.config.feature_dim}, temperature {loaded.temperature:.3f}); derm-sample "
        f"train {len(splits['train'])} / val {len(splits['val'])} / test {len(splits['test'])}; "
        f"OOD set {len(manifest)} images ({args.ood}).",
        "",
        "**Quality checks**: share of images tripping each check (a picture can trip several).",
        "",
        percent_table(quality_frame),
        "",
        f"Cost on a 600x450 image: quality checks {cost['quality_ms']:.2f} ms vs one model "
        f"forward {cost['forward_ms']:.2f} ms (baseline, batch 1) = {cost['ratio']:.2f}x "
        "(medians of 7 runs x 20).",
        "",
        "**OOD methods** (fit on train, threshold on val at <= 5 % false rejection). "
        "*Gate* = quality checks OR OOD score above threshold; aim: >= 95 % of the OOD set "
        "rejected while <= 5 % of test is.",
        "",
        table(pd.DataFrame(ood_rows).T),
        "",
        "**Rejected per kind of picture** (gate = quality checks OR the OOD method):",
        "",
        percent_table(kind_table),
        "",
        "**Conformal prediction sets** (90 % target, fitted on val, measured on test):",
        "",
        table(pd.DataFrame(set_rows).T),
        "",
        "Per-class test coverage:",
        "",
        table(pd.DataFrame(class_rows).T),
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the text between the result markers (the hand-written rest stays)."""
    doc = path.read_text() if path.is_file() else f"{START}\n{END}\n"
    if START not in doc or END not in doc:
        doc += f"\n{START}\n{END}\n"
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    path.write_text(pattern.sub(lambda _: f"{START}\n{text}{END}", doc))


if __name__ == "__main__":
    sys.exit(main())
