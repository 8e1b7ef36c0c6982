"""Training-recipe study at equal wall-clock, scored in-source and across image sources.

    .venv/bin/python -m benchmarks.recipe_study --shards /tmp/dn/shards160 --out /tmp/dn/study

Each arm is one `jobs/train.py` run that changes one thing against the base recipe (flags,
never a fork), with its epochs scaled so that every arm costs about the same CPU time. Every arm
trains WITHOUT one image source (`--exclude-origins`, default ISIC_archive: derm-sample's
non-HAM10000 dermoscopy) and is scored twice, on validation only (never the test split):

- in-source: the run's own validation split (the sources it trained on), last epoch;
- transfer: every train+val image of the left-out source (`jobs/evaluate.py --origins`), which
  the arm never saw, the closest thing here to "images from other sources".

Re-running skips finished arms (each leaves `<out>/<arm>/study.json`). Prints a Markdown table
(arm, wall time, epochs, in-source balanced accuracy and macro AUROC, transfer balanced
accuracy, macro AUROC and melanoma AUC).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIG = "configs/dermanet_small.yaml"  # every arm's, and the BYOL arm's backbone
BASE = [
    "--model-config", MODEL_CONFIG, "--batch-size", "32", "--lr", "2e-3",
    "--weight-decay", "0.02", "--label-smoothing", "0.1", "--warmup-epochs", "1",
    "--channels-last", "--seed", "0",
]  # fmt: skip
# name -> (what changes, extra train flags, image size, epoch factor vs the base's epochs)
ARMS: dict[str, tuple[str, list[str], int, float]] = {
    "base": ("96 px, half width, inverse-frequency weighted CE + LS 0.1", [], 96, 1.0),
    "res80": ("80 px", [], 80, 1.4),
    "res112": ("112 px", [], 112, 0.75),
    "res128": ("128 px", [], 128, 0.55),
    "width-default": (
        "full width (configs/dermanet_default.yaml)",
        ["--model-config", "configs/dermanet_default.yaml"],
        96,
        0.33,
    ),
    "balanced-sampling": (
        "class-balanced sampling instead of a weighted loss",
        ["--sampling-power", "1", "--class-weight-power", "0"],
        96,
        1.0,
    ),
    "sqrt-balance": (
        "square-root sampling + square-root loss weights",
        ["--sampling-power", "0.5", "--class-weight-power", "0.5"],
        96,
        1.0,
    ),
    "mixup-cutmix": (
        "Mixup 0.2 / CutMix 1.0 on half the batches",
        ["--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--mix-prob", "0.5"],
        96,
        1.0,
    ),
    "ema": ("weight EMA 0.998", ["--ema-decay", "0.998"], 96, 1.0),
    "shades-of-gray": (
        "Shades-of-Gray colour constancy",
        ["--color-constancy", "shades_of_gray"],
        96,
        1.0,
    ),
    "camera-aug": (
        "camera/pipeline augmentation p=0.3",
        ["--camera-augment", "0.3"],
        96,
        1.0,
    ),
    "byol-init": (
        "BYOL backbone (pretrained on the kept sources' train images) instead of random init",
        [],
        96,
        1.0,
    ),
}
# Arms that first pretrain a backbone (jobs/pretrain_byol.py, the held-out source left out as
# in fine-tuning, train split only so validation stays unseen), then fine-tune as above with
# --pretrain-ckpt: name -> (pretraining flags, pretraining epochs as a factor of --epochs).
# Their wall time counts both; they cost more than the others (the table says how much).
PRETRAINED: dict[str, tuple[list[str], float]] = {
    "byol-init": (
        ["--model-config", MODEL_CONFIG, "--img-size", "96",
         "--batch-size", "64", "--lr", "1e-3", "--weight-decay", "1e-4",
         "--base-momentum", "0.99", "--warmup-epochs", "1", "--proj-hidden-dim", "512",
         "--pred-hidden-dim", "512", "--proj-out-dim", "128", "--shard-splits", "train",
         "--seed", "0"],
        0.75,
    ),
}  # fmt: skip
TTA_MODES = ("flips", "dihedral", "multicrop")  # evaluated on the base arm's model


def run(command: list[str], log: Path) -> float:
    """Run a job, its output into `log`; seconds of wall time. Fails loudly with the log."""
    started = time.perf_counter()
    with log.open("a") as handle:
        code = subprocess.call(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... exited {code}; see {log}")
    return time.perf_counter() - started


def evaluate(
    checkpoint: Path,
    args: argparse.Namespace,
    out: Path,
    origins: list[str],
    tta: str,
    splits: tuple[str, ...] = ("train", "val"),
) -> dict:
    """jobs/evaluate.py on `splits` (never test) of `origins`; its report."""
    command = [
        sys.executable, "jobs/evaluate.py", "--checkpoint", str(checkpoint), "--shards",
        args.shards, "--split", *splits, "--origins", *origins, "--no-calibrate",
        "--tta", tta, "--output", str(out),
    ]  # fmt: skip
    run(command, out.parent / "evaluate.log")
    return json.loads((out / "report.json").read_text())


def run_arm(name: str, args: argparse.Namespace) -> dict:
    folder = Path(args.out) / name
    done = folder / "study.json"
    if done.is_file():
        return json.loads(done.read_text())
    what, flags, size, factor = ARMS[name]
    epochs = max(2, round(args.epochs * factor))
    folder.mkdir(parents=True, exist_ok=True)
    pretrain_seconds = 0.0
    if name in PRETRAINED:
        byol_flags, byol_factor = PRETRAINED[name]
        byol_name = f"{name}-pretrain"
        pretrain_seconds = run(
            [sys.executable, "jobs/pretrain_byol.py", "--shards", args.shards, *byol_flags,
             "--epochs", str(max(1, round(args.epochs * byol_factor))),
             "--exclude-origins", args.holdout, "--storage-path", str(Path(args.out).resolve()),
             "--name", byol_name],
            folder / "pretrain.log",
        )  # fmt: skip
        backbone = Path(args.out).resolve() / byol_name / "backbone.pt"
        flags = [*flags, "--pretrain-ckpt", str(backbone)]
    command = [
        sys.executable, "jobs/train.py", "--shards", args.shards, *BASE, *flags,
        "--img-size", str(size), "--epochs", str(epochs), "--exclude-origins", args.holdout,
        "--storage-path", str(Path(args.out).resolve()), "--name", name,
    ]  # fmt: skip
    seconds = run(command, folder / "train.log") + pretrain_seconds
    history = pd.read_csv(folder / "logs" / "metrics.csv")
    last = history.dropna(subset=["val/balanced_accuracy"]).iloc[-1]
    transfer = evaluate(folder / "last.pt", args, folder / "transfer", [args.holdout], "none")
    row = {
        "arm": name,
        "change": what,
        "img_size": size,
        "epochs": epochs,
        "minutes": round(seconds / 60, 1),
        "of which pretraining": round(pretrain_seconds / 60, 1),
        "train img/s": round(float(history["perf/train_images_per_sec"].median()), 0),
        "val bal-acc": round(float(last["val/balanced_accuracy"]), 4),
        "val AUROC": round(float(last["val/macro_auroc"]), 4),
        "transfer bal-acc": round(transfer["official"]["balanced_accuracy"], 4),
        "transfer AUROC": round(transfer["metrics"]["macro_auroc"], 4),
        "transfer MEL AUC": round(transfer["melanoma"]["auc"], 4),
    }
    done.write_text(json.dumps(row, indent=2))
    return row


def run_tta(args: argparse.Namespace, in_source: list[str]) -> list[dict]:
    """Test-time augmentation needs no training: score the base arm's model with each mode."""
    rows = []
    base = Path(args.out) / "base"
    for mode in ("none", *TTA_MODES):
        done = base / f"tta-{mode}.json"
        if not done.is_file():
            val = evaluate(
                base / "last.pt", args, base / f"tta-{mode}-val", in_source, mode, ("val",)
            )
            transfer = evaluate(base / "last.pt", args, base / f"tta-{mode}", [args.holdout], mode)
            done.write_text(
                json.dumps(
                    {
                        "arm": f"base + TTA {mode}",
                        "val bal-acc": val["official"]["balanced_accuracy"],
                        "val AUROC": val["metrics"]["macro_auroc"],
                        "transfer bal-acc": transfer["official"]["balanced_accuracy"],
                        "transfer AUROC": transfer["metrics"]["macro_auroc"],
                        "transfer MEL AUC": transfer["melanoma"]["auc"],
                    }
                )
            )
        rows.append(json.loads(done.read_text()))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shards", required=True, help="prepared derm-sample shards (with origin)")
    p.add_argument("--out", required=True, help="study folder (re-running resumes)")
    p.add_argument("--epochs", type=int, default=12, help="epochs of the base arm (96 px)")
    p.add_argument("--holdout", default="ISIC_archive", help="image source left out")
    p.add_argument(
        "--in-source", nargs="+", default=["HAM10000", "ISIC_archive(upGrad-9class)"],
        help="the other sources (scored by the TTA rows)",
    )  # fmt: skip
    p.add_argument(
        "--arms", nargs="+", default=[a for a in ARMS if a not in PRETRAINED],
        choices=list(ARMS), help="arms (byol-init, ~2.5x an arm's cost, only when named)",
    )  # fmt: skip
    p.add_argument("--tta", action="store_true", help="also score TTA modes on the base arm")
    args = p.parse_args(argv)
    rows = []
    for name in args.arms:
        print(f"arm {name} ...", flush=True)
        rows.append(run_arm(name, args))
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows)
    print("\n" + table.to_string(index=False))
    if args.tta:
        print("\n" + pd.DataFrame(run_tta(args, args.in_source)).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
