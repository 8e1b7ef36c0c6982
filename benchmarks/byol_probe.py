"""Frozen-feature probes: does a BYOL backbone beat a randomly initialised one?

    .venv/bin/python benchmarks/byol_probe.py --shards /tmp/dn/derm-shards \\
        --backbone /tmp/dn/byol/derm-byol/backbone.pt --img-size 64

Both backbones (the BYOL `backbone.pt` and a fresh `create_model` of the same config, seeded)
stay frozen. Their GeM features of the train split (deterministic eval transform, no
augmentation) fit two probes, scored on the val split: k-NN (cosine, distance-weighted) and
a class-balanced logistic regression (the linear probe). Before extraction both backbones'
BatchNorm statistics are re-estimated on the train images (a random network's are the
defaults 0/1, BYOL's come from augmented views), so only the learned weights differ.
Balanced accuracy is the ISIC 2019 score; macro AUROC is reported beside it. Labels are
used only here, never in pretraining. Prints a Markdown table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from dermanet.data.pipelines import decode_transform_batch
from dermanet.data.shards import read_manifest, shard_dir
from dermanet.data.transforms import normalize_images
from dermanet.eval.metrics import classification_metrics
from dermanet.inference.checkpoint import load_backbone_file
from dermanet.models import DermResNetSE, create_model


def load_split(
    shards: str, split: str, img_size: int, limit: int | None
) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 (N, 3, S, S) eval-transformed images and their label indices, in shard order."""
    table = pq.read_table(shard_dir(shards, split), columns=["jpeg", "label_index", "index"])
    if limit is not None:
        table = table.slice(0, limit)
    images, labels = [], []
    for start in range(0, table.num_rows, 512):
        batch = decode_transform_batch(table.slice(start, 512).to_pydict(), "eval", img_size)
        images.append(torch.from_numpy(batch["image"]))
        labels.append(batch["label"])
    return torch.cat(images), np.concatenate(labels)


@torch.no_grad()
def recalibrate_batchnorm(model: DermResNetSE, images: torch.Tensor, batch_size: int = 256) -> None:
    """Running BatchNorm statistics as the exact average over `images` (weights untouched)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over all batches
    model.train()
    for i in range(0, len(images), batch_size):
        model.forward_features(normalize_images(images[i : i + batch_size]))
    model.eval()


@torch.inference_mode()
def features(model: DermResNetSE, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Frozen GeM features (what the classifier head sees), eval mode (BN running stats)."""
    model.eval()
    out = [
        model.forward_features(normalize_images(images[i : i + batch_size])).float().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def probe_scores(
    train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray, k: int
) -> dict[str, dict[str, float]]:
    """Balanced accuracy and macro AUROC on val of a k-NN and a linear probe fit on train."""
    scaler = StandardScaler().fit(train)
    train, val = scaler.transform(train), scaler.transform(val)
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance")
    linear = LogisticRegression(max_iter=2000, class_weight="balanced", C=0.1)
    scores = {}
    for name, probe in ((f"k-NN (k={k})", knn), ("linear (logistic)", linear)):
        probe.fit(train, y_train)
        probs = np.zeros((len(val), 8))
        probs[:, probe.classes_] = probe.predict_proba(val)
        metrics = classification_metrics(probs, y_val)
        scores[name] = {m: metrics[m] for m in ("balanced_accuracy", "macro_auroc", "top1")}
    return scores


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--shards", required=True, help="prepared shards (train and val splits used)")
    p.add_argument("--backbone", required=True, help="BYOL backbone.pt (jobs/pretrain_byol.py)")
    p.add_argument("--img-size", type=int, default=64, help="input side (px); use the BYOL one")
    p.add_argument("--k", type=int, default=20, help="neighbours of the k-NN probe")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    p.add_argument("--limit", type=int, help="use only the first N images of each split")
    p.add_argument(
        "--keep-bn-stats", action="store_true",
        help="skip re-estimating BatchNorm statistics on the train images",
    )  # fmt: skip
    p.add_argument("--json", help="also write the numbers to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        read_manifest(args.shards)
        config, state = load_backbone_file(args.backbone)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    byol = create_model(config)
    report = byol.load_backbone(state)
    if report.missing or report.unexpected or report.shape_mismatch:
        print(f"error: {args.backbone} does not fit its own config: {report.summary()}",
              file=sys.stderr)  # fmt: skip
        return 2
    torch.manual_seed(args.seed)
    random_init = create_model(config)

    t0 = time.perf_counter()
    x_train, y_train = load_split(args.shards, "train", args.img_size, args.limit)
    x_val, y_val = load_split(args.shards, "val", args.img_size, args.limit)
    print(f"decoded {len(x_train)} train / {len(x_val)} val images in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
    results = {}
    for name, model in (("BYOL backbone", byol), ("random init", random_init)):
        t0 = time.perf_counter()
        if not args.keep_bn_stats:
            recalibrate_batchnorm(model, x_train)
        f_train, f_val = features(model, x_train), features(model, x_val)
        results[name] = probe_scores(f_train, y_train, f_val, y_val, args.k)
        print(f"{name}: features + probes in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    print(f"\nFrozen {config.name} features, {args.img_size} px, train {len(x_train)} -> val "
          f"{len(x_val)} (balanced accuracy / macro AUROC; chance 0.125 / 0.5)\n")  # fmt: skip
    probes = list(next(iter(results.values())))
    print("| features | " + " | ".join(probes) + " |")
    print("|---|" + "---|" * len(probes))
    for name, scores in results.items():
        cells = [f"{s['balanced_accuracy']:.3f} / {s['macro_auroc']:.3f}" for s in scores.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
