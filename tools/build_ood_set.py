"""Build the out-of-distribution evaluation set (pictures that are NOT dermoscopy), offline.

    python -m tools.build_ood_set --output outputs/trust-ood
    python -m tools.build_ood_set --output outputs/trust-ood \
        --derm-sample ../shared/data/derm-sample

Writes OUTPUT/<kind>/*.png|jpg and OUTPUT/manifest.csv (path, kind, detail). Never commit the
images. Screenshots need Debian's chromium; degraded derm images need --derm-sample (its test
split only). Same --seed, same images.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tools.ood_set import CHROMIUM, CHROMIUM_ENV, DEFAULT_COUNTS, KINDS, build_ood_set


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--output", required=True, help="folder to write (kind folders are replaced)")
    p.add_argument(
        "--derm-sample", help="derm-sample folder (metadata.csv + images/) for degraded images"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every generator")
    p.add_argument(
        "--chromium",
        default=CHROMIUM,
        help=f"headless Chromium for screenshots (default: ${CHROMIUM_ENV}, else found on PATH)",
    )
    p.add_argument(
        "--count",
        action="append",
        default=[],
        metavar="KIND=N",
        help=f"images of one kind (repeatable; 0 skips it); kinds {list(KINDS)}, "
        f"defaults {DEFAULT_COUNTS}",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    counts = {}
    for item in args.count:
        kind, _, number = item.partition("=")
        if kind not in KINDS or not number.isdigit():
            print(f"error: --count expects KIND=N with KIND in {list(KINDS)}, got {item!r}",
                  file=sys.stderr)  # fmt: skip
            return 2
        counts[kind] = int(number)
    report = build_ood_set(args.output, args.derm_sample, args.seed, counts, args.chromium)
    print(report.manifest["kind"].value_counts().to_string())
    for kind, reason in report.skipped.items():
        print(f"skipped {kind}: {reason}")
    print(f"{len(report.manifest)} images, manifest {args.output}/manifest.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
