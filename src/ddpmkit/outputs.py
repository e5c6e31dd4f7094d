"""Output folders: the one owner of every folder a command writes images or models into.

    OUT/.ddpmkit.json   the folder's record: its format, the kind of job (sample, balance,
                        restore) and the job's identity (what determines its files)
    OUT/.ddpmkit.lock   held while a job writes: one job per folder (atomic.FolderLock)

A job writes into a folder that is new, empty, or holds a record of its kind. A record of another
job of that kind is replaced only with --fresh (or freely, when that job wrote nothing), which
deletes the files the kind names inside the folder and nothing else. A folder holding files no
ddpmkit job wrote is refused unless --force, which writes beside them, never over or deletes them. A
training run, `/`, the home folder and the data a job reads are never output folders.
`staged` builds whole folders (import, export) under a hidden name and renames them into place.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .data import users_images
from .errors import UserError, escape_controls
from .run import RUN_FOLDERS, RunDir

FORMAT = "ddpmkit-output/2"
RECORD = atomic.RECORD_NAME


@dataclass(frozen=True)
class Kind:
    """What one kind of job writes: its name, how to speak of it, and its own files (to delete)."""
    name: str  # in the folder's record
    job: str  # "sampling job" ...: the job, in the user's words
    what: str  # "images", "balanced set" ...: what the folder holds
    foreign: str  # the refusal of a folder of someone's files
    own_files: Callable[[Path], list[Path]]
    # the paths (relative, '/'-separated) a job of this identity writes, as a test of a path
    writes: Callable[[dict], Callable[[str], object]]


def inside(folder: Path, relative: str) -> Path | None:
    """folder/relative if it names an entry below `folder` (no absolute path, no '..', no folder on
    the way that links out; the entry itself may be a link, which deleting removes, not its target),
    else None: paths read from a folder's own files are never trusted further."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    path = folder / rel
    try:
        path.parent.resolve().relative_to(folder.resolve())
    except ValueError:
        return None
    return path


# a spreadsheet runs a cell starting with these as a formula
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def escaped(row: list) -> list:
    """A manifest row with each text cell a spreadsheet would run as a formula behind a quote (and
    one that starts so behind a quote already, which `read_manifest` would otherwise take off)."""
    return [f"'{v}" if isinstance(v, str) and v.lstrip("'").startswith(_FORMULA) else v
            for v in row]


def write_manifest(path: Path, rows: list[list], columns: list[str]) -> None:
    """A manifest CSV, written atomically. A text cell that a spreadsheet would run as a formula is
    written behind a quote (OWASP's rule); `read_manifest` takes the quote off again. A job's
    manifest.csv that changes, or is written first, takes the audit and eval results about its
    earlier images (listed, or left by an interrupted job) with it."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(map(escaped, rows))
    if path.name == "manifest.csv" and not (path.is_file() and path.read_text() == buf.getvalue()):
        for stale in about_images(path.parent):
            stale.unlink()
    atomic.write_text(path, buf.getvalue(), fsync=True)


def is_index(cell: str) -> bool:
    """A manifest's index cell: ASCII digits (str.isdigit also takes '²', which int() refuses)."""
    return cell.isascii() and cell.isdigit()


def read_manifest(path: Path, header: bool = True) -> list[list[str]]:
    """The rows of a manifest `write_manifest` (or a job's partial manifest) wrote, without the
    header; a torn last line (a crash mid-append) is left out."""
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
        rows = list(csv.reader(io.StringIO(text[: text.rfind("\n") + 1])))[1 if header else 0:]
    except (UnicodeDecodeError, csv.Error) as exc:  # damaged, or no manifest of ddpmkit's
        raise UserError(f"cannot read {path} ({str(exc)[:100]}): it is not a manifest ddpmkit "
                        f"wrote; move it out of the folder") from None
    return [[v[1:] if v.startswith("'") and v.lstrip("'").startswith(_FORMULA) else v for v in row]
            for row in rows]


def manifest_images(folder: Path, column: str,
                    name: str = "manifest.csv") -> list[tuple[Path, dict]]:
    """(file, row) for each generated image a manifest of `folder` names in `column`; a path
    leading out of the folder is refused."""
    manifest = folder / name
    rows = read_manifest(manifest, header=False)
    if not rows or column not in rows[0]:
        return []
    dicts = [dict(zip(rows[0], row)) for row in rows[1:]]
    out = []
    for row in dicts:
        if row.get("synthetic", "true") != "true":
            continue
        path = inside(folder, row.get(column) or "")
        if path is None:
            raise UserError(f"{manifest} names {str(row.get(column))[:80]!r}, which is not a file "
                            f"inside {folder}: it is not a manifest ddpmkit wrote")
        out.append((path, row))
    return out


def holds_data(folder: Path, data_path: str | None) -> bool:
    """Whether `folder` is the data folder `data_path` or one above it (one inside it is not)."""
    if not data_path:
        return False
    data, where = Path(data_path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return where == data or where in data.parents


def refuse_runs_data(out: Path, run: Path, data_path: str | None) -> None:
    """The folder of a run's training data (or one above it, or one holding its images: a split or
    class folder) would have its images left out of the run's next training as generated; a
    folder of its own inside it is fine."""
    if holds_data(out, data_path):
        raise UserError(f"--out {out} holds {run}'s training data: write the images into a "
                        f"folder of their own (one inside it is fine: training leaves out the "
                        f"folders ddpmkit generated)")
    where, root = out.expanduser().resolve(), Path(data_path or "").expanduser()
    if not (data_path and root.is_dir() and where.is_dir()):  # a new folder holds no data
        return
    # the data folder's images as reading it finds them (through linked class folders)
    real = [f for f in users_images(root) if where in f.resolve().parents]
    if real:
        raise UserError(f"--out {out} holds {len(real)} of the images in {run}'s data folder "
                        f"(e.g. {escape_controls(real[0].name)}): written into, its folder would "
                        f"be read as generated and they would be left out of every read of that "
                        f"data; write into a folder of their own")


def read_record(folder: Path) -> dict | None:
    """The folder's record, or None when it has none (or one ddpmkit cannot read: a pipe, a
    file far larger than a record); another version's record is refused."""
    try:
        record = atomic.read_json(folder / RECORD)
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("job"), dict)):
        return None
    if record.get("format") != FORMAT:  # what it says of its images is not this version's to read
        raise UserError(f"{folder} was written by another version of ddpmkit (its {RECORD} says "
                        f"{str(record.get('format'))[:40]!r}, this one reads {FORMAT!r}): make "
                        f"a new folder with this version, or delete {folder / RECORD} to use its "
                        f"images as a plain folder")
    return record


def refuse_unfinished(folder: Path) -> None:
    """A job's folder without its manifest: what is in it is what the job had made when it
    stopped, not what it was asked for."""
    if not (folder / "manifest.csv").exists() and read_record(folder):
        raise UserError(f"{folder} holds a ddpmkit job that did not finish (it has no "
                        f"manifest.csv yet): rerun the command that made it to finish it")


def job_identities(folder: Path) -> list[dict]:
    """What the records of the jobs under `folder` (a sample output, or a balanced set with one
    sampling job per class) say each job is."""
    records = [read_record(path.parent) for path in sorted(Path(folder).rglob(RECORD))]
    return [record["job"] for record in records if record and isinstance(record["job"], dict)]


def job_runs(folder: Path) -> list[Path]:
    """The runs whose images are under `folder`, as their records name them."""
    return sorted({Path(job["run"]) for job in job_identities(folder)
                   if isinstance(job.get("run"), str)})


def refuse_shared(out: Path, reads: tuple[Path, ...] = ()) -> None:
    """Folders no job writes into: the root, the home folder, the data the job reads."""
    where = out.expanduser().resolve()
    if where == Path(where.anchor) or where == Path.home().resolve():
        raise UserError(
            f"--out {out} is {'the root' if where == Path(where.anchor) else 'your home'} folder: "
            f"choose a folder of its own for the outputs")
    for data in (Path(p).expanduser().resolve() for p in reads):
        if where == data or data in where.parents or where in data.parents:
            raise UserError(f"--out {out} overlaps the data this job reads ({data}): write the "
                            f"outputs elsewhere, or the next run would read them as inputs")


def refuse_special(out: Path, reads: tuple[Path, ...] = (), what: str = "outputs") -> None:
    """Folders no job writes into: those of refuse_shared, and a training run."""
    refuse_shared(out, reads)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file: choose a folder name with --out")
    if RunDir(out).is_run():
        raise UserError(f"--out {out} is a training run: write the {what} into a folder "
                        f"of their own, e.g. --out {out / what.split()[-1]}")
    refuse_run_folders(out, what)


def refuse_run_folders(out: Path, what: str) -> None:
    """A path inside the checkpoints/ or grids/ a training run keeps (and prunes) for itself."""
    where = out.expanduser().resolve()
    for run in where.parents:
        top = where.relative_to(run).parts[0]
        if top in RUN_FOLDERS and RunDir(run).is_run():
            raise UserError(f"--out {out} is inside the {top}/ folder that training keeps in "
                            f"run {run}: write the {what} elsewhere, e.g. "
                            f"--out {run / what.split()[-1]}")


def refuse_linked_folders(out: Path) -> None:
    """A link to a folder inside an output folder would take a job's writes, and its deletions of
    its own files, outside it."""
    for top, folders, _ in os.walk(out):
        for name in folders:
            if (Path(top) / name).is_symlink():
                raise UserError(f"{Path(top) / name} is a link to a folder "
                                f"({os.path.realpath(Path(top) / name)}): ddpmkit writes only "
                                f"into folders inside --out {out}; remove the link")


def _empty_folder(path: Path) -> bool:
    """A folder holding only folders: what a job whose files were deleted leaves."""
    return (path.is_dir() and not path.is_symlink()
            and all(p.is_dir() and not p.is_symlink() for p in path.rglob("*")))


class OutputFolder:
    """`with OutputFolder(out, kind, identity, ...)`: the folder locked and claimed for this job."""

    def __init__(self, out: str | Path, kind: Kind, identity: dict, fresh: bool = False,
                 force: bool = False, reads: tuple[Path, ...] = ()):
        self.path, self.kind, self.identity = Path(out), kind, identity
        self.fresh, self.force, self.reads = fresh, force, reads

    def __enter__(self) -> OutputFolder:
        refuse_special(self.path, self.reads, self.kind.what)
        self.lock = atomic.FolderLock(self.path, self.kind.name)
        self.lock.__enter__()
        try:
            self._claim()
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)

    def _claim(self) -> None:
        refuse_linked_folders(self.path)
        record = read_record(self.path)
        if record is None:
            foreign = [p.name for p in self.path.iterdir()
                       if p.name != atomic.FolderLock.NAME and not _empty_folder(p)]
            if foreign and not self.force:
                over = self._written_over([])
                fix = (f"this {self.kind.job} would write over {over}, even with --force: move "
                       f"it out, or choose another --out" if over else
                       "choose another --out, or add --force to write beside them (ddpmkit "
                       "never deletes them)")
                raise UserError(f"{self.path} holds {self.kind.foreign} "
                                f"({', '.join(sorted(foreign)[:3])}): {fix}")
        elif record.get("kind") != self.kind.name:
            raise UserError(
                f"--out {self.path} holds {_KIND_WHAT.get(record.get('kind'), 'another job')}: "
                f"choose another --out for the {self.kind.what}")
        ours = self.kind.own_files(self.path) if record else []
        if record and record["job"] != self.identity and ours and not self.fresh:
            raise UserError(self._differs(record["job"]))
        self._refuse_writing_over(ours)  # a resume's too: a user's file may sit among its own
        if not record or record["job"] != self.identity or self.fresh:  # not a resume
            self.delete(ours)
        # temporaries a killed job of ours left (names atomic writes make), in its subfolders too
        atomic.remove_stale_temps(*_own_folders(self.path))
        atomic.write_text(self.path / RECORD, json.dumps({"format": FORMAT, "kind": self.kind.name,
                                                          "job": self.identity}, indent=1))

    def _written_over(self, own: list[Path]) -> Path | None:
        """A file where this job writes that is not among `own`, the folder's own job's."""
        own_names, writes = {p.relative_to(self.path).as_posix() for p in own}, self.kind.writes(
            self.identity)
        for path in sorted(self.path.rglob("*")):
            name = path.relative_to(self.path).as_posix()
            if (path.is_file() or path.is_symlink()) and name not in own_names and writes(name):
                return path
        return None

    def _refuse_writing_over(self, own: list[Path]) -> None:
        """Before anything is deleted: a file where this job writes that is not the folder's own
        job's (a user's, beside which --force writes) is refused, never replaced."""
        path = self._written_over(own)
        if path is not None:
            raise UserError(f"{path} is not a file ddpmkit wrote, and this {self.kind.job} "
                            f"would write over it: move it out of {self.path}, or choose "
                            f"another --out")

    def _differs(self, old: dict) -> str:
        diff = [k for k in sorted(set(old) | set(self.identity))
                if old.get(k) != self.identity.get(k)]
        shown = "; ".join(_change(k, old.get(k), self.identity.get(k)) for k in diff[:4])
        return (f"{self.path} holds the {self.kind.what} of another {self.kind.job} ({shown}): "
                f"use --fresh to replace that job's files, or another --out")

    def delete(self, files: list[Path]) -> None:
        """Delete these files of this folder's own jobs (each checked to lie inside it), then the
        folders they leave empty."""
        for path in files:
            rel = os.path.relpath(path, self.path)
            if inside(self.path, rel) is not None and (path.is_symlink() or path.is_file()):
                path.unlink()
        for folder in sorted({p.parent for p in files}, key=lambda p: -len(p.parts)):
            while folder != self.path and self.path in folder.parents and folder.is_dir() \
                    and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent


def matching(regex: str) -> Callable[[dict], Callable[[str], object]]:
    """Kind.writes for a kind whose jobs write the same paths whatever their identity."""
    return lambda _job: re.compile(regex).fullmatch


def _change(key: str, old, new) -> str:
    if isinstance(old, dict) and isinstance(new, dict):  # inputs by name: which ones changed
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return f"{key}: {len(changed)} differ ({', '.join(map(repr, changed[:3]))})"
    return f"{key}: {_shown(old)} -> {_shown(new)}"


def _shown(value) -> str:
    if value is None:  # an option left out
        return "not given"
    return f"{len(value)} names" if isinstance(value, list) and len(value) > 4 else repr(value)


# what `audit` and `eval` write beside a job's images: stale once the images are replaced
ABOUT_IMAGES = ("audit.json", "audit.html", "eval_inception.json", "eval_efficientnet.json",
                "eval_classifier.json")


# how their files open: the JSON with its "written_by" (atomic.json_text), a page with its title
PAGE_HEAD = "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ddpmkit "
_ABOUT_HEADS = (b'{\n "written_by": "ddpmkit ', PAGE_HEAD.encode())


def _about_images_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and atomic.head(path, 100).startswith(
        _ABOUT_HEADS)


def about_images(folder: Path) -> list[Path]:
    """The audit and eval results in `folder` that ddpmkit wrote; a user's file of the same name
    is neither replaced nor deleted."""
    return [path for path in existing(folder, ABOUT_IMAGES) if _about_images_file(path)]


def write_about_images(files: dict[Path, str], mark: str) -> None:
    """Write what audit or eval (`mark`, e.g. "ddpmkit audit") found beside the images it is about.
    A file there that ddpmkit did not write is refused, before anything is written, as is a folder
    a job is writing now."""
    for folder in {path.parent for path in files}:
        refuse_being_written(folder)
    for path in files:
        if path.is_symlink() or path.is_dir() or (path.exists() and not _about_images_file(path)):
            raise UserError(f"{path} is not a file ddpmkit wrote, and {mark} would replace it: "
                            f"move it out of {path.parent}")
    for path, text in files.items():
        atomic.write_text(path, text)


def refuse_being_written(folder: Path) -> None:
    """Images a job is writing now, in `folder`, one below it, or the job's folder above it (up
    to the first folder with a record): what is said about them would describe half of them."""
    folder = Path(folder).resolve()
    above = [folder]
    while not (above[-1] / RECORD).is_file() and above[-1] != above[-1].parent:
        above.append(above[-1].parent)
    for lock in (*(p / atomic.FolderLock.NAME for p in above),
                 *folder.rglob(atomic.FolderLock.NAME)):
        job = atomic.writing_job(lock.parent) if lock.is_file() else None
        if job:
            raise UserError(f"a ddpmkit {job} is writing to {lock.parent} now: wait for it to "
                            f"finish, then run this again")


def _own_folders(top: Path) -> list[Path]:
    """`top` and the folders below it, less links and other jobs' folders (a record or a lock: a
    job beside which --force wrote may be writing its temporaries now)."""
    found = [top]
    for folder, subfolders, _ in os.walk(top):
        subfolders[:] = [name for name in subfolders if not (
            Path(folder, name).is_symlink() or (Path(folder, name) / RECORD).exists()
            or (Path(folder, name) / atomic.FolderLock.NAME).exists())]
        found += [Path(folder, name) for name in subfolders]
    return found


def existing(folder: Path, names) -> list[Path]:
    """The files of `names` that `folder` holds."""
    return [folder / name for name in names if (folder / name).exists()]


def sample_files(folder: Path) -> list[Path]:
    """A sampling job's files: its images (named by their index in individual/; one written just
    before a crash is in no manifest yet), its grids, GIF and manifests, and what audit and eval
    wrote about them."""
    manifests = [folder / "manifest.csv", *sorted(folder.glob(".manifest-rank*.csv"))]
    images = [p for p in sorted(folder.glob("individual/*.png"))
              if re.fullmatch(r"\d+", p.stem) and (p.is_file() or p.is_symlink())]
    grids = [p for p in sorted(folder.glob("grids/grid_*x*.png"))
             if re.fullmatch(r"grid_\d+x\d+", p.stem)]  # "grid_4x4_annotated.png" is a user's
    return [*images, *grids, *(p for p in [folder / "trajectory.gif", *manifests] if p.exists()),
            *about_images(folder)]


SAMPLE_WRITES = (r"individual/\d+\.png|grids/grid_\d+x\d+\.png|manifest\.csv|trajectory\.gif"
                 r"|\.manifest-rank\d+\.csv")
SAMPLE = Kind("sample", "sampling job", "images", "images no ddpmkit sampling job made there",
              sample_files, matching(SAMPLE_WRITES))
_KIND_WHAT = {"sample": "a sampling job's images", "balance": "a balanced set",
              "restore": "restored images", "study": "a downstream study's results"}


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Build a folder under a hidden name beside `out`, then rename it into place: `out` never holds
    half an import or export, whatever interrupts it. Staging folders an earlier, killed job left
    beside `out` are removed first: named as this names them, holding a mark whose process is
    gone."""
    if out.is_symlink():
        raise UserError(f"{out} is a link: give a new folder's name, not a link, as the output")
    if out.is_dir() and any(out.iterdir()):  # a run included: an import or export is a new folder
        raise UserError(f"{out} already exists and is not empty: choose another output folder")
    refuse_special(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for orphan in out.parent.glob(f".{glob.escape(out.name)}.*.partial"):
        if re.fullmatch(r"\.[0-9a-f]{8}\.partial", orphan.name[len(out.name) + 1:]) and (
                _abandoned(orphan)):
            shutil.rmtree(orphan, ignore_errors=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()
    (tmp / _STAGING_MARK).write_text(str(os.getpid()))
    try:
        yield tmp
        (tmp / _STAGING_MARK).unlink()
        if out.exists() and any(out.iterdir()):  # something appeared meanwhile
            raise UserError(f"{out} already exists and is not empty: choose another output folder")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        with contextlib.suppress(OSError):  # make the rename durable where folders can be fsynced
            atomic.fsync_file(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_STAGING_MARK = ".ddpmkit-staging"


def _abandoned(staging: Path) -> bool:
    """A staging folder whose job is gone: its mark names a process that no longer runs (an empty
    or unreadable mark, or a live process, is not ddpmkit's to remove)."""
    mark = staging / _STAGING_MARK
    if staging.is_symlink() or mark.is_symlink() or not mark.is_file():
        return False
    try:
        pid = int(mark.read_text())
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return False  # it still runs
