"""Sampling from a trained run: in memory (`sample`) or into the output layout (`generate`).

Output layout, shared by every command that writes images:

    OUT/individual/000000.png ...   one PNG per image, named by its index
    OUT/grids/grid_4x4.png ...      4x4, 6x6, 8x8 grids of the first images (those that fit)
    OUT/manifest.csv                file, index, seed, sampler, steps, checkpoint, label, synthetic
    OUT/trajectory.gif              with --gif: the first images denoising from noise

A generation job survives interruption: OUT/.ddpmkit-job.json records what is being generated, and
each process appends the rows of images it has finished (after fsyncing them) to its own
OUT/.manifest-rank<r>.csv. Rerunning the same command skips those images; since image k depends only
on (seed, k), the final set equals an uninterrupted run's. manifest.csv is written at the end.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from . import atomic
from .config import SampleConfig
from .distributed import World, barrier
from .errors import UserError
from .images import gif_bytes, make_grid, png_bytes, read_image, scale_for_viewing, to_uint8, upsample
from .run import Run, check_output_folder
from .samplers import SAMPLERS, Callback, Denoiser, ImageNoise, make_timesteps

MANIFEST_COLUMNS = ["file", "index", "seed", "sampler", "steps", "checkpoint", "label", "synthetic"]
GRID_SIDES = (4, 6, 8)
GIF_IMAGES, GIF_FRAMES = 16, 40
JOB_FILE = ".ddpmkit-job.json"
MAX_PENDING_BATCHES = 4  # images waiting for the writer before sampling pauses (bounds memory)


def resolved_steps(sampler: str, steps: int | None, num_timesteps: int) -> int:
    """The steps asked for; else the sampler's default, at most T (a model trained with few timesteps)."""
    return steps or min(SAMPLERS[sampler].default_steps or num_timesteps, num_timesteps)


def sample_batch(run: Run, indices: list[int], seed: int, sampler: str = "ddim", steps: int | None = None,
                 spacing: str = "uniform", eta: float = 0.0, variance: str = "small", clip_x0: bool = True,
                 amp_dtype: torch.dtype | None = None, callback: Callback | None = None,
                 class_label: str | None = None, guidance: float = 1.0) -> torch.Tensor:
    """Images `indices` as [-1, 1] floats on the run's device; image k depends only on (seed, k)
    (and, for a class-conditional run, on its class: `class_label`, or class k mod K by default)."""
    device = run.device
    shape = (run.channels, run.image_size, run.image_size)
    noise = ImageNoise(seed, indices, shape, device)
    labels = class_indices(run, indices, class_label)
    labels = None if labels is None else labels.to(device)
    denoiser = Denoiser(run.net, run.schedule, run.config.diffusion.prediction, clip_x0, amp_dtype, labels, guidance)
    timesteps = make_timesteps(resolved_steps(sampler, steps, run.schedule.num_timesteps), run.schedule, spacing)
    options = {"ddpm": {"variance": variance}, "ddim": {"eta": eta}}.get(sampler, {})
    return SAMPLERS[sampler](denoiser, noise(), timesteps, noise, callback=callback, **options)


def class_indices(run: Run, indices: list[int], class_label: str | None) -> torch.Tensor | None:
    """The class of each image index: the one asked for, else classes in turn (image k: k mod K)."""
    names = run.config.data.class_names
    if not run.config.model.class_conditional or not names:
        if class_label is not None:
            raise UserError(f"--class {class_label}: {run.path} is not class-conditional (train with "
                            f"model.class_conditional=true)")
        return None
    if class_label is None:
        return torch.tensor([k % len(names) for k in indices])
    if class_label not in names:
        raise UserError(f"--class {class_label}: not a class of {run.path} (classes: {', '.join(names[:20])})")
    return torch.full((len(indices),), names.index(class_label))


def class_name(run: Run, index: int, class_label: str | None, guidance: float = 1.0) -> str:
    """The manifest's label column: the class of image `index`, empty for unconditional runs and
    for guidance 0 (the unconditional model of a conditional run)."""
    names = run.config.data.class_names
    if not run.config.model.class_conditional or not names or guidance == 0:
        return ""
    return class_label if class_label is not None else names[index % len(names)]


def sample(run: Run, num: int = 16, seed: int = 0, batch_size: int = 256, size: int | None = None,
           **options) -> torch.Tensor:
    """Notebook API: `num` images as uint8 N x C x H x W (options as in `sample_batch`). An option the
    sampler would ignore (eta off ddim, variance off ddpm, guidance for an unconditional run) is
    refused, as the CLI refuses it."""
    chosen = SimpleNamespace(sampler=options.get("sampler", "ddim"), eta=options.get("eta", 0.0),
                             variance=options.get("variance", "small"), guidance=options.get("guidance", 1.0),
                             class_label=options.get("class_label"))
    check_asked_options(run, chosen, {f"sample.{k}" for k in options})
    out = []
    for start in range(0, num, batch_size):
        x = sample_batch(run, list(range(start, min(num, start + batch_size))), seed, **options)
        out.append(to_uint8(upsample(x, size) if size else x))
    return torch.cat(out)


def _options(cfg: SampleConfig, steps: int, amp_dtype) -> dict:
    return dict(sampler=cfg.sampler, steps=steps, spacing=cfg.spacing, eta=cfg.eta, variance=cfg.variance,
                clip_x0=cfg.clip_x0, amp_dtype=amp_dtype, class_label=cfg.class_label, guidance=cfg.guidance)


def _job_identity(run: Run, cfg: SampleConfig, steps: int) -> dict:
    """What determines the pixels of image k. `num` is not part of it: a job may be extended."""
    return {"run": str(run.path.resolve()), "checkpoint": run.checkpoint, "checkpoint_sha256": run.checkpoint_sha256,
            "ema": cfg.ema, "sampler": cfg.sampler, "steps": steps, "spacing": cfg.spacing, "eta": cfg.eta,
            "variance": cfg.variance, "clip_x0": cfg.clip_x0, "seed": cfg.seed, "size": cfg.size,
            "class_label": cfg.class_label, "guidance": cfg.guidance}


def job_runs(folder: Path) -> list[Path]:
    """The runs that generated the images under `folder` (a sample output, or a balanced set with one
    job per class), as their job files record them."""
    runs = set()
    for path in Path(folder).rglob(JOB_FILE):
        try:
            runs.add(Path(json.loads(path.read_text())["run"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a job file ddpmkit wrote
    return sorted(runs)


def _start_job(out: Path, job: dict, fresh: bool) -> None:
    """Rank 0: check that OUT holds this job (or nothing), record it. Refuses to mix two jobs."""
    check_output_folder(out, "images", "samples")
    job_path = out / JOB_FILE
    if fresh and job_path.exists():  # only a ddpmkit job's files are ever deleted
        shutil.rmtree(out / "individual", ignore_errors=True)
        shutil.rmtree(out / "grids", ignore_errors=True)
        for p in [job_path, out / "manifest.csv", out / "trajectory.gif", *out.glob(".manifest-rank*.csv")]:
            p.unlink(missing_ok=True)
    elif job_path.exists():
        old = json.loads(job_path.read_text())
        diff = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
        if diff:
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {job.get(k)!r}" for k in diff[:4])
            raise UserError(f"{out} holds images of another sampling job ({shown}): use --fresh to replace them, "
                            f"or another --out")
    elif (out / "individual").is_dir() and any((out / "individual").iterdir()):
        raise UserError(f"{out}/individual already holds images no ddpmkit sampling job made there (--fresh replaces "
                        f"only a job's own files): move them, or choose another --out")
    elif (out / "manifest.csv").exists() or any(out.glob(".manifest-rank*.csv")):  # e.g. a balance output's root
        raise UserError(f"{out} holds a manifest.csv no ddpmkit sampling job wrote there: choose another --out")
    (out / "individual").mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(out, out / "individual", out / "grids")  # from a job killed mid-write
    atomic.write_text(job_path, json.dumps(job, indent=1))


def finished_rows(out: Path) -> dict[int, list[str]]:
    """Rows of a finished manifest and of every rank's partial one; a torn last line (a crash
    mid-append) is ignored."""
    rows: dict[int, list[str]] = {}
    done = out / "manifest.csv"
    for path in ([done] if done.exists() else []) + sorted(out.glob(".manifest-rank*.csv")):
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]
        for row in csv.reader(io.StringIO(complete)):
            inside = not Path(row[0]).is_absolute() and ".." not in Path(row[0]).parts if row else False
            if len(row) == len(MANIFEST_COLUMNS) and inside and row[1].isdigit() and (out / row[0]).is_file():
                rows[int(row[1])] = row
    return rows


def _cut_torn_tail(path: Path) -> None:
    """Drop an unfinished last line (no newline) that a killed process left in an append-only file."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


class _Writer:
    """PNG encoding and writing on background threads, so sampling never waits on them. Rows of a
    batch reach the partial manifest only after all its images are written and fsynced."""

    def __init__(self, out: Path, rank: int, threads: int):
        self.out, self.pool = out, ThreadPoolExecutor(max_workers=max(1, threads))
        path = out / f".manifest-rank{rank}.csv"
        _cut_torn_tail(path)  # a crash mid-append: the next row must start on a line of its own
        self.manifest = open(path, "a", newline="")
        self.pending: list[tuple[list[Future], list[list]]] = []
        self.committed = 0

    def submit(self, images: torch.Tensor, rows: list[list], text: dict) -> None:
        futures = [self.pool.submit(_write_png, self.out / row[0], img, text) for img, row in zip(images, rows)]
        self.pending.append((futures, rows))
        self._commit(block=len(self.pending) > MAX_PENDING_BATCHES)

    def _commit(self, block: bool) -> None:
        while self.pending and (block or all(f.done() for f in self.pending[0][0])):
            futures, rows = self.pending.pop(0)
            for f in futures:
                try:
                    f.result()
                except OSError as exc:  # disk full: rows of unwritten images never reach the manifest
                    raise UserError(f"cannot write images to {self.out}: {exc.strerror or exc}; "
                                    f"{self.committed} finished images are kept, rerun to continue") from None
            for row in rows:
                atomic.fsync_file(self.out / row[0])
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            self.manifest.write(buf.getvalue())
            self.manifest.flush()
            os.fsync(self.manifest.fileno())
            self.committed += len(rows)
            block = False

    def close(self) -> None:
        while self.pending:
            self._commit(block=True)
        self.pool.shutdown()
        self.manifest.close()


def _write_png(path: Path, img: torch.Tensor, text: dict) -> None:
    atomic.write_bytes(path, png_bytes(img, text), fsync=False)


def check_asked_options(run: Run, cfg: SampleConfig, asked) -> None:
    """Refuse options asked for (`asked`: the sample.* keys given as flags or overrides) that this job
    would ignore. Values that come from the run's own config (an import's variance) are not asked for."""
    if "sample.eta" in asked and cfg.eta != 0 and cfg.sampler != "ddim":
        raise UserError(f"sample.eta={cfg.eta} applies to the ddim sampler only, not {cfg.sampler}")
    if "sample.variance" in asked and cfg.variance != "small" and cfg.sampler != "ddpm":
        raise UserError(f"sample.variance={cfg.variance} applies to the ddpm sampler only, not {cfg.sampler}")
    if "sample.guidance" in asked and cfg.guidance != 1.0 and not run.config.model.class_conditional:
        raise UserError(f"sample.guidance={cfg.guidance}: {run.path} is not class-conditional, so there is nothing to guide")
    if cfg.guidance == 0 and cfg.class_label is not None:
        raise UserError(f"--class {cfg.class_label} with sample.guidance=0: guidance 0 samples the unconditional model, "
                        f"which ignores the class; drop --class, or use guidance 1 (the plain conditional model)")


def generate(run: Run, cfg: SampleConfig, log=print, fresh: bool = False, world: World = World(),
             amp_dtype: torch.dtype | None = None, progress: bool = True) -> Path:
    """Write cfg.num images into cfg.out_dir in the standard layout; returns the folder.
    Under torchrun every rank calls this and generates its share of the unfinished indices.
    Options a sampler does not use (eta off ddim...) are taken as given; the CLI refuses them."""
    if cfg.num <= 0:
        raise UserError(f"--num must be at least 1, got {cfg.num}")
    class_indices(run, [0], cfg.class_label)  # an unknown class, or one for an unconditional run: before any write
    out = Path(cfg.out_dir)
    steps = resolved_steps(cfg.sampler, cfg.steps, run.schedule.num_timesteps)
    if world.is_main:
        _start_job(out, _job_identity(run, cfg, steps), fresh)
    barrier()
    finished = finished_rows(out)
    unfinished = [k for k in range(cfg.num) if k not in finished]
    todo = unfinished[world.rank::world.size]
    if finished and world.is_main:
        log(f"resuming: {len([k for k in finished if k < cfg.num])} of {cfg.num} images already in {out}")

    text = {"ddpmkit": "synthetic", "source": f"{run.path.name}/{run.checkpoint}", "sampler": f"{cfg.sampler}-{steps}"}
    options = _options(cfg, steps, amp_dtype)
    writer = _Writer(out, world.rank, cfg.writers)
    bar = tqdm(total=len(todo), desc=f"sampling ({cfg.sampler}, {steps} steps)", unit="img", dynamic_ncols=True,
               disable=not progress)
    try:
        for start in range(0, len(todo), cfg.batch_size):
            indices = todo[start:start + cfg.batch_size]
            x = sample_batch(run, indices, cfg.seed, **options)
            images = to_uint8(upsample(x, cfg.size) if cfg.size else x)
            rows = [[f"individual/{k:06d}.png", k, cfg.seed, cfg.sampler, steps, run.checkpoint,
                     class_name(run, k, cfg.class_label, cfg.guidance), "true"] for k in indices]
            writer.submit(images, rows, text)
            bar.update(len(indices))
    finally:
        bar.close()
        writer.close()
    barrier()
    if world.is_main:
        _finish(run, cfg, out, options, len(unfinished), log)
    return out


def _finish(run: Run, cfg: SampleConfig, out: Path, options: dict, made: int, log) -> None:
    rows = finished_rows(out)
    missing = [k for k in range(cfg.num) if k not in rows]
    if missing:
        raise UserError(f"{len(missing)} images missing from {out} after sampling (first: {missing[0]}); rerun the command")
    # the grids show the job's first images: those of an earlier, larger --num too, as the manifest lists them
    first = [read_image(out / rows[k][0]) for k in sorted(rows)[:64]]
    grids = []
    for side in GRID_SIDES:
        if len(first) >= side * side:
            grid = make_grid(torch.stack(first[: side * side]), side)
            grids.append(f"grid_{side}x{side}.png")
            atomic.write_bytes(out / "grids" / grids[-1], png_bytes(scale_for_viewing(grid)), fsync=False)
    if cfg.gif:
        atomic.write_bytes(out / "trajectory.gif", trajectory_gif(run, cfg, options), fsync=False)
    # rows beyond --num stay listed if an earlier run of this job made more
    write_manifest(out / "manifest.csv", [rows[k] for k in sorted(rows)])
    for p in out.glob(".manifest-rank*.csv"):
        p.unlink()
    # the smallest grid needs 16 images: say so rather than name a folder that was not written
    grid_note = (f"grids {', '.join(grids)} to {out}/grids" if grids
                 else f"no grid (one needs at least {GRID_SIDES[0] ** 2} images)")
    if not made:
        done = f"all {cfg.num} images were already in {out}/individual"
    else:
        done = f"wrote {made} images to {out}/individual" + (f" ({cfg.num - made} were there)" if made < cfg.num else "")
    if len(rows) > cfg.num:
        done += f", which holds {len(rows)}: an earlier run of this job made more"
    log(f"{done}, {grid_note}, manifest {out}/manifest.csv" + (f", trajectory {out}/trajectory.gif" if cfg.gif else ""))


def trajectory_gif(run: Run, cfg: SampleConfig, options: dict) -> bytes:
    """The first images (same noise as in the job) from noise to image, as a GIF of grids."""
    n = min(cfg.num, GIF_IMAGES)
    n_steps = options["steps"]
    keep = set(np.round(np.linspace(0, n_steps - 1, min(GIF_FRAMES, n_steps))).astype(int).tolist())
    frames = []

    def record(i, x, x0):
        if i in keep:
            imgs = x.clamp(-1, 1)
            frames.append(scale_for_viewing(make_grid(to_uint8(upsample(imgs, cfg.size) if cfg.size else imgs))))

    sample_batch(run, list(range(n)), cfg.seed, callback=record, **options)
    return gif_bytes(frames)


def write_manifest(path: Path, rows: list[list], columns: list[str] = MANIFEST_COLUMNS) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue(), fsync=True)
