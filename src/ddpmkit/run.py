"""A run directory: everything one training run produced, and how to load it back.

    RUN/config.yaml       the resolved config (what `ddpmkit sample RUN` rebuilds the model from)
    RUN/meta.json         versions, git hash, command line, device, dataset description
    RUN/state.json        checkpoints with step, SHA-256 and mean loss; which one is best
    RUN/stats.jsonl       one JSON line per log interval
    RUN/checkpoints/      step_000001000.safetensors ...
    RUN/grids/            step_000001000.png ... (same noise every time, so grids compare)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import atomic
from .checkpoint import file_sha256, load_into, read_checkpoint
from .config import Config, from_dict, read_run_config
from .errors import UserError
from .schedule import Schedule
from .unet import UNet


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.yaml"
        self.meta_path = self.path / "meta.json"
        self.state_path = self.path / "state.json"
        self.stats_path = self.path / "stats.jsonl"
        # sha256 of every training image as the model saw it (in-memory data only): which images the
        # generator was trained on, kept with the run so a later study can rule out leakage
        self.digests_path = self.path / "training_images.sha256"
        self.checkpoints = self.path / "checkpoints"
        self.grids = self.path / "grids"

    def read_state(self) -> dict:
        if not self.state_path.exists():
            return {"checkpoints": [], "best": None}
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {self.state_path}: {exc}") from None

    def meta(self) -> dict:
        """meta.json, or {} when it is missing or not ddpmkit's."""
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def is_run(self) -> bool:
        """The mark of a run: meta.json as ddpmkit writes it (its environment names ddpmkit), or, for
        a run copied without it, state.json's checkpoint list beside config.yaml. config.yaml alone is
        not one: it is a common file name, and another tool's may parse as ours."""
        if "ddpmkit" in (self.meta().get("environment") or {}):
            return True
        try:
            return self.config_path.is_file() and isinstance(json.loads(self.state_path.read_text())["checkpoints"], list)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def imported_from(self) -> str | None:
        """Where an imported model came from (such a run has no training data of its own), else None."""
        return self.meta().get("imported_from")

    def read_stats(self) -> list[dict]:
        """The rows of stats.jsonl; a torn last line (a crash mid-append) is left out."""
        rows = []
        for line in self.stats_path.read_text().splitlines() if self.stats_path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
        return rows

    def write_state(self, state: dict) -> None:
        atomic.write_text(self.state_path, atomic.json_text(state))

    def checkpoint_file(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:09d}.safetensors"

    def verified_checkpoints(self, warn=print) -> list[dict]:
        """Recorded checkpoints, newest first, that exist and match their recorded SHA-256."""
        good = []
        for entry in sorted(self.read_state()["checkpoints"], key=lambda e: -e["step"]):
            path = self.path / entry["file"]
            if not path.exists():
                warn(f"checkpoint {path} is missing; skipping it")
            elif file_sha256(path) != entry["sha256"]:
                warn(f"checkpoint {path} is damaged (SHA-256 mismatch); skipping it")
            else:
                good.append(entry)
        return good

    def select_checkpoint(self, which: str) -> dict:
        """'latest', 'best' or a step number -> the checkpoint entry (verified)."""
        entries = self.verified_checkpoints()
        if not entries:
            raise UserError(f"{self.path} has no usable checkpoint: train it first (ddpmkit train --out {self.path})")
        if which == "latest":
            return entries[0]
        if which == "best":
            best = self.read_state().get("best")
            match = [e for e in entries if e["step"] == best]
            if not match:
                raise UserError(f"{self.path}: the best checkpoint (step {best}) is not available; use --checkpoint latest")
            return match[0]
        try:
            step = int(which)
        except ValueError:
            raise UserError(f"--checkpoint must be latest, best or a step number, got {which!r}") from None
        match = [e for e in entries if e["step"] == step]
        if not match:
            raise UserError(f"{self.path} has no checkpoint at step {step} (have: {', '.join(str(e['step']) for e in entries)})")
        return match[0]


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
    """The depth these runs read wide pixels at (their config.yaml records it), so real images compared
    with their samples, or a resumed run's own, are read as their training images were. None if they
    differ or record none; runs no longer here, or whose config cannot be read, are left out (what
    needs more of them says what is wrong)."""
    depths = set()
    for run in runs:
        try:
            depths.add(read_run_config(Path(run) / "config.yaml")["data"]["bit_depth"])
        except (UserError, KeyError, TypeError):
            continue
    return depths.pop() if len(depths) == 1 else None


def check_output_folder(out: Path, what: str, subfolder: str) -> None:
    """An --out for generated files (`what`) must be a folder, or not exist yet, and not a training run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file: choose a folder name with --out")
    if RunDir(out).is_run():
        raise UserError(f"--out {out} is a training run: write the {what} into a folder of their own, "
                        f"e.g. --out {out / subfolder}")


def load_run(path: str | Path, checkpoint: str = "latest", ema: bool = True, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> Run:
    """The run's network on `device`, in eval mode. `dtype` (bf16, for sampling on a GPU) casts the
    weights once; the samplers then feed the network that dtype instead of autocasting fp32 weights
    on every call (on an H100 the 64x64 job network ran 1.3x faster so, RESULTS.md)."""
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise UserError(f"run directory not found: {run_dir.path}")
    if not run_dir.config_path.is_file():
        raise UserError(f"{run_dir.path} is not a ddpmkit run (no config.yaml)")
    cfg = from_dict(read_run_config(run_dir.config_path))
    entry = run_dir.select_checkpoint(checkpoint)
    ckpt_path = run_dir.path / entry["file"]
    prefix = "ema" if ema else "model"
    groups, meta = read_checkpoint(ckpt_path, prefixes=(prefix,))
    net = UNet(cfg.model, cfg.data.image_size)
    load_into(net, groups[prefix], f"checkpoint {ckpt_path}")
    # Plain NCHW, not channels_last: eager GroupNorm is 2.3x slower on channels_last tensors, which
    # made the whole sampling forward 1.3x slower on an H100 (compiled, the two layouts tie).
    net.to(device, dtype).eval().requires_grad_(False)
    return Run(run_dir.path, cfg, net, Schedule.from_config(cfg.diffusion), meta["step"], ckpt_path.name, entry["sha256"])
