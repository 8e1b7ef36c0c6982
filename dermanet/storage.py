"""Storage locations that may be a local folder or a URI (s3://, gs://, file://).

Every job takes such a location for shards, checkpoints and results, so the same command works
on a laptop and on a cluster; pyarrow's filesystems do the work.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

# read once, at import: os.umask can only be read by setting it, which is not thread-safe
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations, False for plain paths."""
    return "://" in str(location)


def resolve_filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any URI pyarrow understands."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    """Join path parts onto a location, keeping a URI a URI."""
    base = str(location).rstrip("/")
    return "/".join([base, *parts])


def exists(location: str | Path) -> bool:
    fs, path = resolve_filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_nonempty_dir(location: str | Path) -> bool:
    fs, path = resolve_filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    return bool(fs.get_file_info(pafs.FileSelector(path, recursive=False)))


def delete_dir_contents(location: str | Path) -> None:
    fs, path = resolve_filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)


BUCKET_SCHEMES = ("s3", "gs", "gcs")  # object stores: one filesystem per bucket


@functools.lru_cache(maxsize=8)
def _bucket_filesystem(scheme: str, netloc: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")[0]


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a local file, read in 1 MiB pieces (model files are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_bytes(location: str | Path) -> bytes:
    """Whole file as bytes, from a local path or a URI.

    One filesystem per bucket and process, reused: an S3 filesystem looks up the bucket's
    region when it is made, which per image would cost more than reading it.
    """
    if not is_uri(location):
        return Path(location).read_bytes()
    parts = urlparse(str(location))
    if parts.scheme in BUCKET_SCHEMES:
        filesystem, path = _bucket_filesystem(parts.scheme, parts.netloc), parts.netloc + parts.path
    else:
        filesystem, path = resolve_filesystem(location)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str | Path, data: bytes) -> None:
    fs, path = resolve_filesystem(location)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def write_json(location: str | Path, payload: Any) -> None:
    write_bytes(location, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_json(location: str | Path) -> Any:
    return json.loads(read_bytes(location))


def copy_file(source: str | Path, target: str | Path) -> None:
    """Copy one file between any two locations (local paths or URIs)."""
    write_bytes(target, read_bytes(source))


def atomic_write(
    path: str | Path, data: bytes | Callable[[IO[bytes]], Any], *, mode: int | None = None
) -> Path:
    """Write bytes (or whatever `data(handle)` writes) to a local file, atomically.

    Temp file, fsync, rename: readers never see a partial file.
    The temp name starts with a dot and ends in `.tmp`, so folder listings (`*.pt`, uploads)
    skip it; a crash leaves no half-written file behind under the real name.
    Permissions: `mode` if given; else those of the file it replaces; else what `open()` would
    give (0o666 less the umask). A temp file alone is private (0o600), and a model or index
    written that way could not be read by a Serve replica running as another user.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes | bytearray):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
