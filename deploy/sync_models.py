"""Copy the model registry from object storage to a local folder (Serve reads a local registry).

    python deploy/sync_models.py s3://bucket/registry /home/ray/dermanet-models

Run by cluster.yaml's setup_commands on every node. A registry that does not exist yet (a new
bucket) leaves an empty folder and exits 0; Serve then falls back to the shipped weights/.
Only pyarrow is needed (no AWS / gcloud CLI).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.fs as pafs


def sync(source: str, target: str) -> int:
    Path(target).mkdir(parents=True, exist_ok=True)
    fs, path = (
        pafs.FileSystem.from_uri(source)
        if "://" in source
        else (pafs.LocalFileSystem(), str(Path(source).resolve()))
    )
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        print(f"no registry at {source} yet; {target} left as it is")
        return 0
    pafs.copy_files(path, str(Path(target).resolve()), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
    print(f"copied {source} -> {target}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(sync(sys.argv[1], sys.argv[2]))
