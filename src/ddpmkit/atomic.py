"""Atomic file writes: write beside the target under a temporary name, optionally fsync, rename.

A crash at any instant leaves either the old complete file or the new complete file, never a torn
one. `fsync=True` (checkpoints, state, manifests) also makes the rename durable across power loss.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError

# mkstemp creates files as 0600; finished files get the usual 0666 & ~umask instead. The umask can
# only be read by setting it, which is not thread-safe, so it is read once, here.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.ddpmkit-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:  # make the rename durable where folders can be fsynced
            with contextlib.suppress(OSError):
                fsync_file(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a write that failed (disk full, quota): name what it was for
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise
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


def head(path: Path, size: int) -> bytes:
    """A file's first `size` bytes (what says who wrote it), without reading the rest."""
    with open(path, "rb") as f:
        return f.read(size)


# atomic_path's names: "." + the target's name + ".ddpmkit-" + mkstemp's 8 random letters, digits
# or _ + ".tmp"
_TEMPORARY = re.compile(r"\..+\.ddpmkit-[a-z0-9_]{8}\.tmp")


def is_temporary(path: Path) -> bool:
    """A name `atomic_path` makes (a user's ".notes.tmp" or ".sync.document.tmp" is not one)."""
    return bool(_TEMPORARY.fullmatch(path.name))


_IN_PLACE = {"a": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "r+": os.O_RDWR | os.O_CREAT,
             "rb+": os.O_RDWR, "rb": os.O_RDONLY}


def open_in_place(path: Path, mode: str):
    """Open one of ddpmkit's own files to change it in place (an append, a truncation, the lock),
    never through a link or into a pipe planted under its name: those are refused by name."""
    try:
        fd = os.open(path, _IN_PLACE[mode] | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise UserError(f"{path} is a link or not a regular file: ddpmkit changes its own files in "
                        f"place, never through one; remove it")
    return os.fdopen(fd, mode, **({} if "b" in mode else {"newline": ""}))


MAX_RECORD_BYTES = 64 << 20  # a restoration record lists its inputs: half a million fit


def read_small_text(path: Path, limit: int = MAX_RECORD_BYTES) -> str:
    """The text of a record ddpmkit reads back (meta.json, state.json, an output's record). A pipe
    or device planted under its name, or a file over `limit` bytes, raises OSError instead of
    hanging the job or filling its memory."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise OSError(f"{path} is not a regular file of at most {limit} bytes")
        return f.read(limit).decode()


def read_json(path: Path, limit: int = MAX_RECORD_BYTES):
    """A JSON record ddpmkit reads back (read_small_text's checks); ValueError for text that is no
    JSON, or that nests deeper than the parser goes (a crafted file)."""
    try:
        return json.loads(read_small_text(path, limit))
    except RecursionError:
        raise ValueError(f"{path} nests too deep for a ddpmkit record") from None


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


RECORD_NAME = ".ddpmkit.json"  # marks a folder of outputs as ddpmkit's (outputs.py)


class FolderLock:
    """One ddpmkit job per folder: an advisory flock on FOLDER/.ddpmkit.lock, held while the job
    writes and released by the OS however it ends (even kill -9). The file names the holder, so a
    second job is refused with a line that says which job is there. A folder the lock created, or
    the lock file in a folder the job was refused, is removed again on release if the job wrote
    nothing."""

    NAME = ".ddpmkit.lock"

    def __init__(self, folder: str | Path, job: str):
        self.folder, self.job = Path(folder), job

    def __enter__(self) -> FolderLock:
        import sys
        import time

        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"output path {self.folder} is a file: choose a folder with --out")
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:  # a lock taken on a file its last holder unlinked meanwhile is taken again
            self.file = open_in_place(self.folder / self.NAME, "r+")
            try:
                _flock_soon(self.file)
            except OSError:
                self.file.seek(0)
                job, detail = _holder(self.file.read())
                self.file.close()
                raise UserError(f"another ddpmkit {job} is writing to {self.folder}{detail}: "
                                f"wait for it, stop it, or choose another --out") from None
            if self._still_named():
                break
            self.file.close()
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"job": self.job, "pid": os.getpid(), "command": sys.argv,
                                    "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self.file.flush()
        return self

    def _still_named(self) -> bool:
        try:
            return os.stat(self.folder / self.NAME).st_ino == os.fstat(self.file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc) -> None:
        # unlinked while held: a job opening the file now is refused, a later one makes a new one
        (self.folder / self.NAME).unlink(missing_ok=True)
        self.file.close()
        if self.created and not any(self.folder.iterdir()):  # refused before it wrote anything
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def _flock_soon(file, tries: int = 20) -> None:
    """An exclusive lock, tried for a second: `writing_job` holds a shared one for an instant."""
    import fcntl
    import time

    for attempt in range(tries):
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            if attempt == tries - 1:
                raise
            time.sleep(0.05)


def writing_job(folder: Path) -> str | None:
    """The job holding FOLDER's lock now ("sample (pid 1, since ...)"), or None. Asked with a
    shared lock held for an instant, on a file opened read-only, so a folder one may only read
    can be read."""
    import fcntl

    try:
        with open_in_place(Path(folder) / FolderLock.NAME, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                job, detail = _holder(f.read(4096).decode("utf-8", "replace"))
                return job + detail
    except (OSError, UserError):  # no lock file (no job), or one ddpmkit would not take either
        return None
    return None


def _holder(text: str) -> tuple[str, str]:
    """('train', ' (pid 123, since ...)') from a lock file's contents, as far as they can be
    read."""
    try:
        info = json.loads(text)
        return str(info["job"]), f" (pid {info['pid']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "job", ""
