"""Build a model's similar-cases index: its training images' features, diagnoses, thumbnails.

examples:
  python jobs/build_index.py --model weights/default.pt --shards /data/shards
  python jobs/build_index.py --model default --csv metadata.csv --images images/ --thumbnails 0

Runs the served model over the TRAIN split with Ray Data (the batch-inference path) and writes
`<model id>.index.parquet` beside the model: image id, diagnosis, lesion id, L2-normalised
float16 feature and a small JPEG thumbnail per image, tied to the model file's SHA-256. Serve
answers POST /v1/similar from it. Unreadable images are left out and listed, never fatal.
"""

from __future__ import annotations

import sys

from dermanet.cli import parse_settings, run_job, settings_parser, setup_logging
from dermanet.inference.index_build import IndexSettings, build_index
from dermanet.runtime import init_ray


def build_parser():
    return settings_parser(__doc__, IndexSettings)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    settings, args = parse_settings(build_parser(), argv, IndexSettings)

    def work():
        settings.validate()
        joined = init_ray(address=args.address)
        return build_index(settings, fixed_cluster=joined is None)

    code, outcome = run_job(work)
    if outcome is not None:
        print(
            f"{outcome.rows} images of model {outcome.model_id!r} indexed ({outcome.failed} "
            f"unreadable left out) in {outcome.seconds:.1f} s -> {outcome.path} "
            f"({outcome.size_bytes / 2**20:.2f} MB)"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
