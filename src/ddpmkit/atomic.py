"""Atomic file writes: write beside the target under a temporary name, optionally fsync, rename.

A crash at any instant leaves either the old complete file or the new complete file, never a torn
one. `fsync=True` (checkpoints, state, manifests) also makes the rename durable across power loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator

# mkstemp creates files as 0600; finished files get the usual 0666 & ~umask instead. The umask can
# only be read by setting it, which is not thread-safe, so it is read once, here.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (a read-only descriptor suffices on POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(path: Path) -> bool:
    """A name `atomic_path` makes."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def remove_stale_temps(*folders: Path) -> int:
    """Delete temporaries that a killed process (SIGKILL, power loss) left behind in `folders`;
    returns how many. Only names `atomic_path` makes are touched."""
    removed = 0
    for folder in folders:
        if Path(folder).is_dir():
            for p in filter(is_temporary, Path(folder).iterdir()):
                p.unlink(missing_ok=True)
                removed += 1
    return removed


def write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str, fsync: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), fsync)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def json_text(obj, indent: int | None = 1) -> str:
    """JSON that any parser reads: NaN and infinities (a loss not measured yet, a p-value of tied
    seeds) become null instead of Python's non-standard NaN."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), indent=indent, allow_nan=False)
