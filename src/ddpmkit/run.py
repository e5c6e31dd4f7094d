"""A run directory: everything one training run produced, owned by `RunDir`, and how to load it
back.

    RUN/meta.json         the format version, versions, git hash, command line, device, the data
    RUN/config.yaml       the resolved config (what `ddpmkit sample RUN` rebuilds the model from)
    RUN/state.json        checkpoints with step, SHA-256, mean loss (and evaluation); the best one
    RUN/stats.jsonl       one JSON line per log interval, and one per evaluation and audit
    RUN/training_images.sha256   one digest per training image (downstream's leakage guard)
    RUN/checkpoints/      step_000001000.safetensors ...
    RUN/grids/            step_000001000.png ... (same noise every time, so grids compare)
    RUN/report.html, RUN/learning.gif, RUN/tensorboard/, RUN/.ddpmkit.lock

Nothing read from these files is trusted further than it is checked: a checkpoint is a file of
checkpoints/ named by its step, and it is deleted only when its digest is the one recorded.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic
from .checkpoint import file_sha256, load_into, read_checkpoint
from .config import (Config, as_typed, data_config, flatten, from_dict, parse_override, read_yaml,
                     to_yaml)
from .data import ImageData, image_digests, load_images
from .errors import UserError, warn
from .runtime import resolve_device
from .schedule import Schedule
from .unet import UNet, check_fits

MAX_STATS_LINE = 1 << 20  # a row ddpmkit writes is a few hundred bytes
FORMAT = "ddpmkit-run/2"  # meta.json's "format": a run of another format is refused, not converted
# meta.json's fields a resume brings up to date: what the run trains on from then on
RESUMED_META = ("data", "num_images", "skipped_images", "processes", "class_counts",
                "labels_sha256")
READ_AS_TRAINED = ("data.image_size", "data.channels", "data.bit_depth")
RUN_FILES = ("config.yaml", "state.json", "stats.jsonl", "training_images.sha256", "report.html",
             "learning.gif")
# with RUN_FILES, what --fresh deletes: these folders' files that ddpmkit names so (a user's stay)
RUN_FOLDERS = {"checkpoints": r"step_\d{9}\.safetensors", "grids": r"step_\d{9}\.png",
               "tensorboard": r"events\.out\.tfevents\..+"}
# Keys a resume may change. The first never change what is computed; the second change it by float
# rounding only (another summation order, kernels or device): accepted, and recorded in meta.json.
SAME_COMPUTATION = ("train.max_steps", "train.max_minutes", "train.log_every", "train.sample_every",
                    "train.checkpoint_every", "train.keep_last", "train.out_dir",
                    "train.max_nonfinite", "train.eval_every", "train.eval_num",
                    "train.eval_features", "train.tensorboard", "train.dist_timeout_minutes",
                    "train.audit_every", "train.audit_num", "train.grid_images", "train.grid_steps",
                    "data.stream", "data.workers", "sample.")
ROUNDING_ONLY = ("train.grad_accum", "train.activation_checkpointing", "train.channels_last",
                 "train.device", "model.compile", "model.compile_mode")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# --holdout's words: a new one starts only at "data.key=", so a path keeps its spaces
_DATA_WORD = re.compile(r"\s+(?=data\.\w+=)")


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.meta_path = self.path / "meta.json"
        self.state_path = self.path / "state.json"
        self.stats_path = self.path / "stats.jsonl"
        self.digests_path = self.path / "training_images.sha256"
        self.checkpoints = self.path / "checkpoints"
        self.grids = self.path / "grids"
        self.changes: list[dict] = []  # set by prepare: a resume's changes that round differently

    # --- reading ---------------------------------------------------------------------------------

    def meta(self) -> dict:
        """meta.json, or {} when it is missing or not ddpmkit's."""
        try:
            meta = atomic.read_json(self.meta_path)
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def is_run(self) -> bool:
        """Whether ddpmkit made this folder a run (of any version): its meta.json says so."""
        meta = self.meta()
        environment = meta.get("environment")
        return (str(meta.get("format", "")).startswith("ddpmkit-run/")
                or isinstance(environment, dict) and "ddpmkit" in environment)

    def config(self) -> Config:
        """The run's resolved config; a folder that is not a run of this format is refused."""
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a ddpmkit run: no such folder")
        if not self.is_run() or not self.config_path.is_file():
            raise UserError(f"{self.path} is not a ddpmkit run "
                            f"(no meta.json and config.yaml of one)")
        found = self.meta().get("format", "ddpmkit-run/1")
        if found != FORMAT:
            raise UserError(f"{self.path} was written by another version of ddpmkit ({found}; this "
                            f"one reads {FORMAT}): use that version, or train the run again")
        raw = read_yaml(self.config_path)
        if not isinstance(raw, dict):
            raise UserError(f"{self.config_path} is not a ddpmkit config "
                            f"(expected a mapping of sections)")
        return from_dict(raw)

    def imported_from(self) -> str | None:
        """Where an imported model came from (such a run has no training data of its own), else
        None."""
        return self.meta().get("imported_from")

    def read_state(self) -> dict:
        """state.json, checked entry by entry: {"checkpoints": [...], "best": step or None}."""
        if not self.state_path.exists():
            return {"checkpoints": [], "best": None}
        try:
            state = atomic.read_json(self.state_path)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {self.state_path} ({exc}): restore it, or rerun with "
                            f"--fresh to start the run over") from None
        entries = state.get("checkpoints") if isinstance(state, dict) else None
        bad = "not a mapping with a checkpoints list" if not isinstance(entries, list) else next(
            (why for why in map(self._entry_problem, entries) if why), None)
        if bad is None and state.get("best") is not None and not _is_int(state["best"]):
            bad = f"best is {state['best']!r}"
        if bad:
            raise UserError(f"{self.state_path} is not a state file ddpmkit wrote ({bad}): "
                            f"restore it, or rerun with --fresh to start the run over")
        return {"checkpoints": entries, "best": state.get("best")}

    def _entry_problem(self, e) -> str | None:
        if not isinstance(e, dict) or not _is_int(e.get("step")) or e["step"] < 0:
            return f"a checkpoint entry without a step: {str(e)[:80]!r}"
        if e.get("file") != self.checkpoint_name(e["step"]):
            return f"checkpoint of step {e['step']} named {str(e.get('file'))[:80]!r}"
        if not isinstance(e.get("sha256"), str) or not _SHA256.fullmatch(e["sha256"]):
            return f"checkpoint of step {e['step']} without a SHA-256"
        numbers = [e.get("loss"), e.get("fd")]
        if any(v is not None and not _is_number(v) for v in numbers):
            return f"checkpoint of step {e['step']} with a loss or FD that is not a number"
        return None

    def training_images(self, log=print) -> torch.Tensor:
        return self.training_set(log).images

    def training_set(self, log=print) -> ImageData:
        """The images (and labels) the run trained on, read again as it read them; refused when it
        recorded none (an imported run), or when its data is no longer what it recorded. A
        streamed run records none (it never holds its data whole): its data as it is now stands
        in."""
        if not self.is_run():
            raise UserError(f"{self.path} is not a ddpmkit training run: give the folder "
                            f"`ddpmkit train --out` wrote")
        if self.imported_from():
            raise UserError(f"{self.path} is an imported model: the images it was trained on are "
                            f"unknown")
        streamed = not self.digests_path.is_file() and self.config().data.stream
        if not self.digests_path.is_file() and not streamed:
            raise UserError(f"{self.path} recorded no training images ({self.digests_path.name}): "
                            f"train it again to record them")
        source = self.config().data
        checked = "" if streamed else f", and checked against {self.digests_path.name}"
        for path in (source.path, source.labels):
            if path and not Path(path).expanduser().exists():
                raise UserError(f"{self.path} trained on {path}, which is no longer there: put it "
                                f"back there (the images it trained on are needed{checked})")
        data = load_images(source, log)
        if streamed:
            log(f"note: {self.path} streamed its data, so it recorded no training images: its "
                f"data as it is now stands in for them")
            return data
        recorded = self.recorded_digests()
        unseen = sum(d not in recorded for d in data.digests)
        if unseen:
            raise UserError(f"{self.path}'s data has changed since it trained ({unseen} image(s) "
                            f"it never saw): the images it trained on are needed")
        return data

    def recorded_digests(self) -> set[str]:
        """training_images.sha256's digests (none without one)."""
        return set(self.digests_path.read_text().split()) if self.digests_path.is_file() else set()

    def training_images_sha256(self) -> str:
        """A digest of training_images.sha256 ("" without one): a run trained again on other images
        has another."""
        return file_sha256(self.digests_path) if self.digests_path.is_file() else ""

    def data_values(self) -> dict:
        """The run's data section as data.key=value pairs, to change a key of."""
        cfg = self.config()
        values = {f"data.{k}": v for k, v in cfg.to_dict()["data"].items() if k != "class_names"}
        return values | {"data.channels": cfg.model.in_channels}

    def other_data(self, where: str, flag: str = "--holdout", log=print) -> ImageData:
        """Real images besides the training ones, read as those were (size, channels, bit depth):
        a folder or file, or data.key=value words changing the run's own data (data.split=val;
        'data.path=other.npz data.split=val'). What reading them leaves out is said, as in
        training."""
        values = self.data_values()
        if "=" in where and not Path(where).exists():  # a folder may be named a=b
            for word in _DATA_WORD.split(where.strip()):
                key, value = parse_override(word)
                if key in READ_AS_TRAINED and value != values[key]:
                    raise UserError(f"{word}: real images are compared with the run's at its "
                                    f"{key}={values[key]}; give other images with data.path=... "
                                    f"or data.split=...")
                values[key] = value
        else:
            values |= {"data.path": where, "data.labels": None, "data.split": "train"}
        try:
            data = load_images(data_config(values), log=lambda message: log(f"{flag}: {message}"))
        except UserError as exc:  # the flag it came from, for the user to find
            raise UserError(f"{flag} {where}: {exc}") from None
        if data.skipped:
            log(f"{flag}: warning: skipped {len(data.skipped)} unreadable image(s), e.g. "
                f"{data.skipped[0][0]}: {data.skipped[0][1]}")
        return data

    def unseen(self, images: torch.Tensor) -> torch.Tensor:
        """Per image (uint8): True unless it is one of the run's recorded training images."""
        if self.digests_path.is_file():
            trained = self.recorded_digests()
        else:  # a streamed run's data as it is now; an imported run's are unknown
            trained = set(image_digests(self.training_set(log=lambda *_: None).images)) if (
                self.config().data.stream and not self.imported_from()) else set()
        return torch.tensor([d not in trained for d in image_digests(images)], dtype=torch.bool)

    def holdout_images(self, where: str | None, drop_overlap: bool = False,
                       log=print) -> torch.Tensor | None:
        """Held-out real images (`other_data`; None without `where`). None may be a training
        image: the run's record proves it. Those that are are refused, or with `drop_overlap`
        left out."""
        if where is None:
            if drop_overlap:
                raise UserError("--drop-overlap leaves training images out of --holdout: add "
                                "--holdout DATA, or leave --drop-overlap out")
            return None
        data = self.other_data(where, log=log)
        if data.upsampled:
            side = self.config().data.image_size
            log(f"holdout: warning: {data.upsampled} of its {len(data)} images are smaller than "
                f"the run's {side}x{side} and were enlarged to it; blurred, they sit farther from "
                f"the training images and raise the copy threshold: hold out images of at least "
                f"that size")
        trained = self.config().data.class_names
        foreign = sorted(set(data.labels or []) - set(trained or data.labels or []))
        if foreign:  # nearer to nothing the run saw, they would raise the copy threshold
            raise UserError(f"--holdout {where} holds classes {self.path} was not trained on "
                            f"({', '.join(foreign[:5])}): hold out images of its classes "
                            f"({', '.join(trained[:5])}), e.g. with data.filter_label=...")
        images = data.images
        unseen = self.unseen(images)
        shared = len(images) - int(unseen.sum())
        if shared and not drop_overlap:
            raise UserError(f"--holdout {where}: {shared} of its images are training images of "
                            f"{self.path}; a holdout must be images the generator never saw "
                            f"(--drop-overlap leaves them out)")
        if shared:
            log(f"holdout: left out {shared} of {len(images)} images that are training images")
            images = images[unseen]
        if len(images) < 20:
            raise UserError(f"--holdout {where} holds {len(images)} images the generator never "
                            f"saw: calibrating a threshold needs at least 20 (hundreds are better)")
        return images

    def stats_rows(self, damaged: list[int] | None = None) -> Iterator[dict]:
        """The rows of stats.jsonl, a line at a time; blank lines, a torn last line (a crash
        mid-append), a line of damaged bytes and one longer than any row ddpmkit writes are left
        out (the numbers of the last two kinds into `damaged`)."""
        if not self.stats_path.is_file():
            return
        number, starts = 0, True  # the line a chunk of at most MAX_STATS_LINE is from
        with open(self.stats_path, errors="replace", newline="\n") as f:
            while line := f.readline(MAX_STATS_LINE):
                first, starts = starts, line.endswith("\n")
                if not first:  # the rest of a line longer than any row
                    continue
                number += 1
                row = _row(line) if starts or len(line) < MAX_STATS_LINE else None
                if row is not None:
                    yield row
                elif line.strip() and damaged is not None:
                    damaged.append(number)
        if damaged and damaged[-1] == number and not starts:  # torn: a crash mid-append
            damaged.pop()

    def read_stats(self, most: int = 20_000) -> list[dict]:
        """stats.jsonl's rows, thinned evenly to at most `most` (what a report plots), in bounded
        memory however long the file."""
        rows, stride = [], 1
        for i, row in enumerate(self.stats_rows()):
            if i % stride == 0:
                rows.append(row)
                if len(rows) > most:
                    rows, stride = rows[::2], stride * 2
        return rows

    @staticmethod
    def checkpoint_name(step: int) -> str:
        return f"checkpoints/step_{step:09d}.safetensors"

    def checkpoint_file(self, step: int) -> Path:
        return self.path / self.checkpoint_name(step)

    def verified_checkpoints(self, warn=warn) -> list[dict]:
        """Recorded checkpoints, newest first, that exist and match their recorded SHA-256."""
        good = []
        for entry in sorted(self.read_state()["checkpoints"], key=lambda e: -e["step"]):
            path = self.checkpoint_file(entry["step"])
            if not path.is_file():
                warn(f"checkpoint {path} is missing; skipping it")
            elif file_sha256(path) != entry["sha256"]:
                warn(f"checkpoint {path} is damaged (SHA-256 mismatch); skipping it")
            else:
                good.append(entry)
        return good

    def select_checkpoint(self, which: str) -> dict:
        """'latest', 'best' or a step number -> the checkpoint entry (verified). Checkpoints found
        missing or damaged are warned of when another is used; a refusal is its one line."""
        said = []
        entry = self._choose_checkpoint(which, self.verified_checkpoints(warn=said.append))
        for message in said:
            warn(message)
        return entry

    def _choose_checkpoint(self, which: str, entries: list[dict]) -> dict:
        if not entries and self.read_state()["checkpoints"]:
            raise UserError(f"{self.path}: every checkpoint it recorded is missing or damaged: "
                            f"train it again (ddpmkit train --out {self.path} --fresh)")
        if not entries:
            raise UserError(f"{self.path} has no usable checkpoint: train it first "
                            f"(ddpmkit train --out {self.path})")
        if which == "latest":
            return entries[0]
        if which == "best":
            best = self.read_state().get("best")
            match = [e for e in entries if e["step"] == best]
            if not match:
                raise UserError(f"{self.path}: the best checkpoint (step {best}) is not available; "
                                f"use --checkpoint latest")
            return match[0]
        try:
            step = int(which)
        except ValueError:
            raise UserError(f"--checkpoint must be latest, best or a step number, "
                            f"got {which!r}") from None
        match = [e for e in entries if e["step"] == step]
        if not match:
            raise UserError(f"{self.path} has no checkpoint at step {step} (have: "
                            f"{', '.join(str(e['step']) for e in entries)})")
        return match[0]

    # --- writing (training) ----------------------------------------------------------------------

    def prepare(self, cfg: Config, fresh: bool, log) -> Path | None:
        """Decide between a fresh start and a resume; returns the checkpoint to resume from."""
        if self.path.is_dir() and not self.is_run() and any(
                p.name != atomic.FolderLock.NAME and not atomic.is_temporary(p)
                for p in self.path.iterdir()):
            raise UserError(f"{self.path} exists and is not a ddpmkit run: choose another --out")
        linked = [name for name in RUN_FOLDERS if (self.path / name).is_symlink()]
        if linked:  # training would write, then prune, files wherever it points
            raise UserError(f"{self.path / linked[0]} is a link: a run writes and deletes files "
                            f"in a {linked[0]}/ folder of its own; replace the link with a folder")
        if fresh:
            if (cfg.train.init_from
                    and Path(cfg.train.init_from).expanduser().resolve() == self.path.resolve()):
                raise UserError(f"--fresh would delete {self.path}'s checkpoints, which "
                                f"train.init_from starts from: choose another --out")
            self._delete_run_folders()
            for name in RUN_FILES:  # meta.json stays, the run's mark, until training replaces it
                (self.path / name).unlink(missing_ok=True)
            return None
        atomic.remove_stale_temps(self.path, self.checkpoints, self.grids)  # a run killed mid-write
        self._refuse_a_partial_record()
        if not self.config_path.exists():
            return None
        self._check_resumable(cfg, log)
        if not self.read_state()["checkpoints"]:
            return None  # stopped before its first checkpoint: nothing to resume
        good = self.verified_checkpoints(warn=lambda m: log(f"warning: {m}"))
        if not good:
            raise UserError(f"{self.path}: no intact checkpoint to resume from; "
                            f"rerun with --fresh to start over")
        self._forget_unusable(good, cfg.train.keep_last)
        return self.checkpoint_file(good[0]["step"])

    def _forget_unusable(self, good: list[dict], keep_last: int) -> None:
        """Missing or damaged checkpoints leave the record: kept, they would be warned of by every
        command and counted in keep_last instead of intact ones. A damaged file stays: it no longer
        holds what ddpmkit wrote, so it is not ddpmkit's to delete."""
        if len(good) < len(self.read_state()["checkpoints"]):
            self._commit(good, keep_last)

    def _delete_run_folders(self) -> None:
        atomic.remove_stale_temps(self.checkpoints, self.grids)
        for name, ours in RUN_FOLDERS.items():
            folder = self.path / name
            if folder.is_dir() and not folder.is_symlink():
                for path in folder.iterdir():
                    if re.fullmatch(ours, path.name) and (path.is_file() or path.is_symlink()):
                        path.unlink()
                with contextlib.suppress(OSError):  # it holds the user's files
                    folder.rmdir()

    def _refuse_a_partial_record(self) -> None:
        """Checkpoints whose config.yaml or state.json is gone would be mixed with a new start's, or
        written over by it."""
        saved = self.checkpoints.is_dir() and any(self.checkpoints.glob("step_*.safetensors"))
        lost = (self.config_path if not self.config_path.exists()
                and (saved or self.state_path.exists())
                else self.state_path if not self.state_path.exists() and saved else None)
        if lost is not None:
            raise UserError(f"{self.path} holds a run's checkpoints but its {lost.name} is "
                            f"missing: restore it to resume, or rerun with --fresh to start over")

    def refuse_changed_config(self, cfg: Config) -> None:
        """A resume whose config changes what is computed is refused (a run with a config only)."""
        old, new = flatten(self.config().to_dict()), flatten(cfg.to_dict())
        # train.init_from first: its architecture explains the model.* keys that change with it
        refused = sorted(refused_changes(old, new), key=lambda k: k != "train.init_from")
        if refused:
            more = len(refused) - 5
            shown = "; ".join(f"{k}: {as_typed(old.get(k))} -> {as_typed(new.get(k))}"
                              for k in refused[:5]) + (f"; {more} more" if more > 0 else "")
            raise UserError(f"{self.path} was trained with a different config ({shown}): "
                            f"rerun with --fresh to start over there, or choose another --out")

    def _check_resumable(self, cfg: Config, log) -> None:
        """Refuse a resume whose config changes what is computed; record the changes that only
        round."""
        self.refuse_changed_config(cfg)
        old, new = flatten(self.config().to_dict()), flatten(cfg.to_dict())
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        self.changes = []
        for key in diff:
            if key.startswith(ROUNDING_ONLY):
                self.add_change(key, old.get(key), new.get(key), log)

    def add_change(self, key: str, old, new, log) -> None:
        """A resume's change that rounds differently: said, and recorded in meta.json with its
        step."""
        self.changes.append({"key": key, "from": old, "to": new})
        log(f"note: {key} changes from {as_typed(old)} to {as_typed(new)}: from here the run "
            f"equals an uninterrupted one to float rounding, not bit for bit (recorded in "
            f"{self.meta_path.name})")

    def start(self, cfg: Config, meta: dict, step: int) -> None:
        """Write the run's record: meta.json (the run's mark) and config.yaml at a fresh start; at a
        resume, config.yaml's new values and the changes that round differently, with their step."""
        if step == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.meta_path, atomic.json_text({"format": FORMAT, **meta}))
            atomic.write_text(self.stats_path, "")  # there from the start, as the layout says
            self.digests_path.unlink(missing_ok=True)
        else:  # what the run trains on now; the environment and source it started from stay
            record = self.meta() | {k: meta[k] for k in RESUMED_META if k in meta}
            if self.changes:
                record["changes"] = (record.get("changes", [])
                                     + [{"step": step, **c} for c in self.changes])
            atomic.write_text(self.meta_path, atomic.json_text(record))
        atomic.write_text(self.config_path, to_yaml(cfg))
        if step == 0:  # so no checkpoint is ever on disk without the record that would name it
            self.write_state({"checkpoints": [], "best": None})

    def write_state(self, state: dict) -> None:
        atomic.write_text(self.state_path, atomic.json_text(state))

    def append_stats(self, record: dict) -> None:
        with atomic.open_in_place(self.stats_path, "a") as f:
            f.write(atomic.json_text(record, indent=None) + "\n")

    def truncate_stats(self, step: int, log=print) -> None:
        """Drop log lines past the step training restarts from (written after its checkpoint, before
        the crash), and a torn last line; damaged lines elsewhere are said."""
        damaged: list[int] = []
        if self.stats_path.exists():
            with atomic.atomic_path(self.stats_path) as tmp, open(tmp, "w") as out:
                for row in self.stats_rows(damaged):
                    if row["step"] <= step:
                        out.write(atomic.json_text(row, indent=None) + "\n")
        if damaged:
            log(f"warning: {len(damaged)} damaged line(s) of {self.stats_path} "
                f"({'line' if len(damaged) == 1 else 'lines'} "
                f"{', '.join(map(str, damaged[:5]))}{', ...' if len(damaged) > 5 else ''}) were "
                f"left out: the log has no row for them")

    def record_training_images(self, digests: list[str], log) -> None:
        """Keep training_images.sha256 a record of every image the run has trained on: a resume on
        changed data adds the new images, with a warning."""
        now = set(digests)
        before = self.recorded_digests()
        if before - now:
            log(f"warning: {len(before - now)} image(s) {self.path} trained on are no longer in "
                f"its data: training goes on without them ({self.digests_path.name} still "
                f"records them)")
        if now <= before:
            return
        if before:
            log(f"warning: the data changed since {self.path} started "
                f"({len(now - before)} image(s) it had not seen): training goes on with it, and "
                f"{self.digests_path.name} now records those too")
        atomic.write_text(self.digests_path, "\n".join(sorted(before | now)) + "\n")

    def warn_relabelled(self, meta: dict, digests: list[str], log) -> None:
        """A resume on the same images under other labels (a labels CSV edited since) is said, as
        one on changed images is: the run has learnt its classes from both labellings. `meta`:
        the resume's class_counts and labels_sha256."""
        before, counts = self.meta(), meta["class_counts"]
        if set(digests) != self.recorded_digests() or not counts:  # new images: said as such
            return
        old = before.get("class_counts") if isinstance(before.get("class_counts"), dict) else {}
        changed = [f"{c}: {old.get(c, 0)} -> {counts.get(c, 0)}"
                   for c in sorted(set(old) | set(counts)) if old.get(c) != counts.get(c)]
        if old and changed:
            said = f"images per class {', '.join(changed[:5])}"
        elif before.get("labels_sha256") not in (None, meta["labels_sha256"]):
            said = "the same counts per class, other images in them"
        else:
            return
        log(f"warning: the labels changed since {self.path} started ({said}): training goes on "
            f"with them, and {self.meta_path.name} now records the new labels")

    def add_checkpoint(self, sha256: str, step: int, mean_loss: float, keep_last: int) -> None:
        """Record the checkpoint of `step` (already written to checkpoint_file(step)), then
        prune."""
        entries = [e for e in self.read_state()["checkpoints"] if e["step"] != step]
        entries.append({"step": step, "file": self.checkpoint_name(step), "sha256": sha256,
                        "loss": mean_loss})
        self._commit(entries, keep_last)

    def record_evaluation(self, step: int, metrics: dict, keep_last: int) -> None:
        """The evaluation of a saved checkpoint: logged, and it may make the checkpoint the best
        one."""
        self.append_stats({"step": step, "eval": metrics})
        entries = self.read_state()["checkpoints"]
        for e in entries:
            if e["step"] == step:
                e["fd"], e["fd_of"] = metrics["fd"], fd_of(metrics)
        self._commit(entries, keep_last)

    def _commit(self, entries: list[dict], keep_last: int) -> None:
        """Name the kept checkpoints and the best one in state.json, then delete the others: files
        of checkpoints/ that hold what ddpmkit recorded there, nothing else."""
        # best: lowest eval FD of those measured as the latest was (train.eval_features and
        # eval_num may change on resume), else lowest mean loss
        measured = [e for e in entries if _is_number(e.get("fd")) and math.isfinite(e["fd"])]
        scored = [e for e in measured if e.get("fd_of") == max(measured, key=_step).get("fd_of")]
        by_loss = [e for e in entries if e["loss"] is not None and math.isfinite(e["loss"])]
        if scored:
            best = min(scored, key=lambda e: e["fd"])["step"]
        else:  # a checkpoint saved before any loss was logged has none: the latest, if none has one
            best = (min(by_loss, key=lambda e: e["loss"])["step"] if by_loss
                    else max(e["step"] for e in entries))
        keep = {e["step"] for e in sorted(entries, key=lambda e: -e["step"])[:keep_last]} | {best}
        # and the best as each earlier measure saw it: one changed measure deletes no best
        for measure in {e.get("fd_of") for e in measured}:
            keep.add(min((e for e in measured if e.get("fd_of") == measure),
                         key=lambda e: e["fd"])["step"])
        self.write_state({"checkpoints": [e for e in entries if e["step"] in keep], "best": best})
        for e in entries:  # only after state.json no longer names them
            path = self.checkpoint_file(e["step"])
            if (e["step"] not in keep and path.is_file() and not path.is_symlink()
                    and file_sha256(path) == e["sha256"]):
                path.unlink()


def refused_changes(old: dict, new: dict) -> list[str]:
    """The keys of two configs (nested or flat dicts) that differ in a way a resume refuses."""
    a, b = flatten(old), flatten(new)
    return [k for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(SAME_COMPUTATION + ROUNDING_ONLY)]


def fd_of(metrics: dict) -> str:
    """What an evaluation's FD was measured on: only FDs of the same are compared."""
    return (f"{metrics.get('features')} features ({metrics.get('weights')}) of "
            f"{metrics.get('images')} images")


def _step(entry: dict) -> int:
    return entry["step"]


def _row(line: str) -> dict | None:
    """A stats.jsonl line's row, or None where it is none."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    ok = isinstance(row, dict) and _is_int(row.get("step")) and 0 <= row["step"] < 2**63
    return row if ok else None


def _is_number(value) -> bool:
    """A JSON number a float holds (an integer past a float's range is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Run:
    """A trained run loaded for inference: config, schedule and (EMA) network."""

    path: Path
    config: Config
    net: torch.nn.Module
    schedule: Schedule
    step: int
    checkpoint: str  # file name, for manifests
    checkpoint_sha256: str = ""
    ema: bool = True  # the EMA weights, else the raw ones
    loaded_as: str = "latest"  # the checkpoint asked for: latest, best or a step

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    @property
    def channels(self) -> int:
        return self.config.model.in_channels

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def recorded_bit_depth(runs: list[Path]) -> int | None:
    """The depth these runs read wide pixels at (their config.yaml records it), so real images
    compared with their samples are read as their training images were. None if they differ or
    record none; runs no longer here, or not readable, are left out (what needs more of them says
    what is wrong)."""
    depths = set()
    for run in runs:
        try:
            depths.add(RunDir(run).config().data.bit_depth)
        except UserError:
            continue
    return depths.pop() if len(depths) == 1 else None


def load_run(path: str | Path, checkpoint: str = "latest", ema: bool = True,
             device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Run:
    """The run's network on `device`, in eval mode. `dtype` (bf16, for sampling on a GPU) casts the
    weights once; the samplers then feed the network that dtype instead of autocasting fp32 weights
    on every call."""
    device = resolve_device(str(device))  # "auto", or a CUDA one this machine lacks: one line
    run_dir = RunDir(path)
    cfg = run_dir.config()
    entry = run_dir.select_checkpoint(checkpoint)
    ckpt_path = run_dir.checkpoint_file(entry["step"])
    prefix = "ema" if ema else "model"
    check_fits(cfg.model, cfg.data.image_size, device)
    groups, meta = read_checkpoint(ckpt_path, prefixes=(prefix,))
    net = UNet(cfg.model, cfg.data.image_size)
    load_into(net, groups[prefix], f"checkpoint {ckpt_path}")
    # Plain NCHW, not channels_last: eager GroupNorm is slow on channels_last tensors.
    net.to(device, dtype).eval().requires_grad_(False)
    return Run(run_dir.path, cfg, net, Schedule.from_config(cfg.diffusion), meta["step"],
               ckpt_path.name, entry["sha256"], ema, str(checkpoint))
