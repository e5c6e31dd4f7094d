"""Sampling from a trained run: in memory (`sample`) or into the output layout (`generate`).

A sampling job's output layout (`sample`, and each class job of `balance`):

    OUT/individual/000000.png ...   one PNG per image, named by its index
    OUT/grids/grid_4x4.png ...      4x4, 6x6, 8x8 grids of the first images (those that fit)
    OUT/manifest.csv                file, index, seed, sampler, steps, checkpoint, label, synthetic
                                    (and nearest, with --drop-copies)
    OUT/trajectory.gif              with --gif: the first images denoising from noise

A generation job survives interruption: the folder's record (outputs.py) holds what is being
generated, and each process appends the rows of images it has finished (after fsyncing them) to
its own OUT/.manifest-rank<r>.csv. Rerunning the same command skips those images; since image k
depends only on (seed, k), the final set equals an uninterrupted run's. manifest.csv comes last.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import atomic
from .config import SampleConfig, sample_config
from .data import batch_to_model
from .distributed import World, barrier
from .errors import UserError, expect
from .images import gif_bytes, make_grid, png_bytes, scale_for_viewing, to_uint8, upsample
from .limits import MAX_IMAGES_PER_JOB, MAX_SIDE, check_count, check_memory
from .metrics.memorization import CopyFilter, is_copy
from .outputs import (SAMPLE, OutputFolder, escaped, is_index, read_manifest, refuse_runs_data,
                      write_manifest)
from .pixels import read_image
from .run import Run, RunDir
from .runtime import mix_seed
from .samplers import (SAMPLERS, Callback, Denoiser, ImageNoise, make_timesteps, sampler_named,
                       sdedit_start, timesteps_from)
from .unet import sampling_bytes

MANIFEST_COLUMNS = ["file", "index", "seed", "sampler", "steps", "checkpoint", "label", "synthetic"]
GRID_SIDES = (4, 6, 8)
GIF_IMAGES, GIF_FRAMES = 16, 40
MAX_PENDING_BATCHES = 4  # images waiting for the writer before sampling pauses (bounds memory)
MAX_GUIDANCE = 100.0  # beyond this the guided output is all saturation (and overflows float32)


def no_unconditional_model(run: Run) -> str:
    """Why a run with train.label_dropout=0 cannot be guided."""
    if RunDir(run.path).meta().get("label_dropout_known") is False:
        return (f"{run.path} was imported from weights that do not say whether labels were "
                f"dropped in training (if they were, set train.label_dropout in its config.yaml), "
                f"so it may not have learnt the unconditional model that guidance other than 1 "
                f"uses")
    return (f"{run.path} was trained with train.label_dropout=0, so it never learnt the "
            f"unconditional model that guidance other than 1 uses")


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample, checked once: the sampler, its steps and spacing, its one option (eta for
    ddim, variance for ddpm), clipping, and class-conditional guidance."""
    sampler: str = SampleConfig.sampler
    steps: int | None = None  # None: the sampler's default, at most T
    spacing: str = SampleConfig.spacing
    eta: float = SampleConfig.eta
    variance: str = SampleConfig.variance
    clip_x0: bool = SampleConfig.clip_x0
    guidance: float = SampleConfig.guidance
    class_label: str | None = None

    @classmethod
    def from_config(cls, sc: SampleConfig) -> SamplingSpec:
        return cls(**{f.name: getattr(sc, f.name) for f in dataclasses.fields(cls)})

    def checked(self, run: Run, asked=()) -> SamplingSpec:
        """This spec with its steps resolved for `run`; refused where an option asked for (`asked`:
        the sample.* keys given) would be ignored, or where values would overflow."""
        sampler_named(self.sampler)
        defaults = SampleConfig()
        for key in sorted({s.option for s in SAMPLERS.values() if s.option}):
            value = getattr(self, key)
            if (f"sample.{key}" in asked and value != getattr(defaults, key)
                    and SAMPLERS[self.sampler].option != key):
                owners = [name for name, s in SAMPLERS.items() if s.option == key]
                raise UserError(f"sample.{key}={value} applies to the {' and '.join(owners)} "
                                f"sampler{'s' if len(owners) > 1 else ''} only, not "
                                f"{self.sampler}")
        if not 0 <= self.eta <= 1:
            raise UserError(f"sample.eta={self.eta}: DDIM's eta runs from 0 (deterministic) "
                            f"to 1 (DDPM's variance)")
        if not 0 <= self.guidance <= MAX_GUIDANCE:
            raise UserError(f"sample.guidance={self.guidance}: use 0 to {MAX_GUIDANCE:g} "
                            f"(1-5 are usual; more saturates every pixel)")
        if ("sample.guidance" in asked and self.guidance != 1.0
                and not run.config.model.class_conditional):
            raise UserError(f"sample.guidance={self.guidance}: {run.path} is not "
                            f"class-conditional, so there is nothing to guide")
        if (self.guidance != 1.0 and run.config.model.class_conditional
                and run.config.train.label_dropout == 0):
            raise UserError(f"sample.guidance={self.guidance}: {no_unconditional_model(run)}; "
                            f"sample with guidance 1")
        if self.guidance == 0 and self.class_label is not None:
            raise UserError(f"--class {self.class_label} with sample.guidance=0: guidance 0 "
                            f"samples the unconditional model, which ignores the class; drop "
                            f"--class, or use guidance 1 (the plain conditional model)")
        class_indices(run, [0], self.class_label)  # unknown class, or one for an unconditional run
        T = run.schedule.num_timesteps
        if self.steps is not None and not 1 <= self.steps <= T:
            raise UserError(f"sample.steps={self.steps}: the model has {T} timesteps; use 1 to {T}")
        return dataclasses.replace(self, steps=self.steps_for(T))

    def steps_for(self, num_timesteps: int) -> int:
        """The steps asked for, else the sampler's default (at most T)."""
        T = num_timesteps
        return self.steps or min(SAMPLERS[self.sampler].default_steps or T, T)

    def options(self) -> dict:
        option = SAMPLERS[self.sampler].option
        return {option: getattr(self, option)} if option else {}


@dataclass(frozen=True)
class Anchors:
    """Real images that generated ones start from (balance --from-real): image k of a job is
    images[k mod n] forward-noised to t = strength * (T - 1), then denoised (SDEdit, Meng et al.
    2022), so it varies that image instead of coming from pure noise."""
    images: torch.Tensor  # uint8 N x C x H x W at the run's size
    strength: float  # in (0, 1]: near 0 the real image comes back, 1 ignores it

    def __post_init__(self):
        if not len(self.images):
            raise UserError("--from-real: no real images to start from")

    @staticmethod
    def check(strength: float, spec: SamplingSpec) -> None:
        """Refused: a strength outside (0, 1], or a spacing other than the one it steps with."""
        if not 0 < strength <= 1:
            raise UserError(f"--from-real {strength}: use a strength above 0 (which would "
                            f"return the real image itself) and at most 1 (pure noise)")
        if spec.spacing != SampleConfig.spacing:
            raise UserError(f"--from-real steps down evenly from its strength: sample.spacing="
                            f"{spec.spacing} does not apply; give sample.spacing="
                            f"{SampleConfig.spacing} (the run's config.yaml names the other)")

    def checked(self, spec: SamplingSpec, num_timesteps: int) -> SamplingSpec:
        """`spec` checked, with the steps these images take: the strength's t, then at most the
        integer timesteps below it (`timesteps_from`)."""
        self.check(self.strength, spec)
        taken = timesteps_from(self.strength * (num_timesteps - 1), spec.steps_for(num_timesteps))
        return dataclasses.replace(spec, steps=len(taken))

    @cached_property
    def identity(self) -> dict:
        """What the job's images depend on: the strength and the images, in order."""
        digest = hashlib.sha256(self.images.contiguous().numpy().tobytes()).hexdigest()
        return {"strength": self.strength, "images_sha256": digest, "images": len(self.images)}

    def start(self, run: Run, indices: list[int], noise: ImageNoise,
              steps: int) -> tuple[torch.Tensor, list[float]]:
        """x_t of images `indices` and the timesteps from t down."""
        x0 = batch_to_model(self.images[[k % len(self.images) for k in indices]]).to(run.device)
        return sdedit_start(run.schedule, x0, self.strength, noise, steps)


def sample_batch(run: Run, indices: Sequence[int], seed: int, spec: SamplingSpec,
                 amp_dtype: torch.dtype | None = None, callback: Callback | None = None, *,
                 anchors: Anchors | None = None) -> torch.Tensor:
    """Images `indices` as [-1, 1] floats on the run's device; image k depends only on (seed, k)
    (and, for a class-conditional run, on its class: spec.class_label, or class k mod K). With
    `anchors`, image k starts from real image k mod n instead of pure noise. `callback` is first
    called as (-1, the starting images, None), then after each step."""
    indices = list(indices)
    shape = (run.channels, run.image_size, run.image_size)
    noise = ImageNoise(seed, indices, shape, run.device)
    labels = class_indices(run, indices, spec.class_label)
    denoiser = Denoiser(
        run.net, run.schedule, run.config.diffusion.prediction, spec.clip_x0, amp_dtype=amp_dtype,
        labels=None if labels is None else labels.to(run.device), guidance=spec.guidance)
    steps = spec.steps_for(run.schedule.num_timesteps)
    x, timesteps = (anchors.start(run, indices, noise, steps) if anchors else
                    (noise(), make_timesteps(steps, run.schedule, spec.spacing)))
    if callback:
        callback(-1, x, None)
    return SAMPLERS[spec.sampler](denoiser, x, timesteps, noise, callback=callback,
                                  **spec.options())


def class_indices(run: Run, indices: list[int], class_label: str | None) -> torch.Tensor | None:
    """The class of each image index: the one asked for, else classes in turn (image k: k mod K)."""
    names = run.config.data.class_names
    if not run.config.model.class_conditional or not names:
        if class_label is not None:
            raise UserError(f"--class {class_label}: {run.path} is not class-conditional "
                            f"(train with model.class_conditional=true)")
        return None
    if class_label is None:
        return torch.tensor([k % len(names) for k in indices])
    if class_label not in names:
        raise UserError(f"--class {class_label}: not a class of {run.path} "
                        f"(classes: {', '.join(names[:20])})")
    return torch.full((len(indices),), names.index(class_label))


def manifest_label(run: Run, index: int, spec: SamplingSpec) -> str:
    """The manifest's label column: the class of image `index`, empty for unconditional runs and
    for guidance 0 (the unconditional model of a conditional run)."""
    names = run.config.data.class_names
    if not run.config.model.class_conditional or not names or spec.guidance == 0:
        return ""
    return spec.class_label if spec.class_label is not None else names[index % len(names)]


def sample(run: Run, num: int = 16, seed: int = 0, batch_size: int = 256, size: int | None = None,
           **options) -> torch.Tensor:
    """Notebook API: `num` images as uint8 N x C x H x W; `options` are SamplingSpec's (sampler,
    steps, spacing, eta, variance, clip_x0, guidance, class_label), with SampleConfig's defaults.
    An option the sampler would ignore is refused, as the CLI refuses it."""
    expect(run, Run, "sample() takes a run loaded by ddpmkit.load_run(path)")
    loaded = sorted(set(options) - {f.name for f in dataclasses.fields(SamplingSpec)})
    if loaded:  # checkpoint, ema, device...: chosen when the run was loaded, or not sample()'s
        raise UserError(f"sample() option {loaded[0]}: not a sampling option (those are "
                        f"{', '.join(f.name for f in dataclasses.fields(SamplingSpec))}); the "
                        f"checkpoint, EMA weights and device are load_run's to choose")
    cfg = sample_config({"num": num, "seed": seed, "batch_size": batch_size, "size": size,
                         **options})
    spec = _checked(run, cfg, asked={f"sample.{k}" for k in options})
    out = []
    for start in range(0, num, batch_size):
        x = sample_batch(run, range(start, min(num, start + batch_size)), seed, spec)
        out.append(to_uint8(upsample(x, size) if size else x))
    return torch.cat(out)


def keys_asked(run: Run, cfg: SampleConfig, asked: set[str] | None) -> set[str]:
    """The sample.* keys a caller set: those the command line was given, else (the Python API)
    those where `cfg` differs from the run's own sample section."""
    if asked is not None:
        return set(asked)
    return {f"sample.{f.name}" for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(run.config.sample, f.name)}


def _checked(run: Run, cfg: SampleConfig, asked: set[str] | None) -> SamplingSpec:
    """The job's sampling spec, checked with its counts and output size."""
    asked = keys_asked(run, cfg, asked)
    check_count(cfg.num, MAX_IMAGES_PER_JOB, "sample.num")
    check_count(cfg.size or 0, MAX_SIDE, "sample.size")
    if cfg.size is not None and cfg.size < run.image_size:
        raise UserError(f"sample.size (--size) {cfg.size} is below the model's "
                        f"{run.image_size}x{run.image_size}: --size upsamples its output")
    return SamplingSpec.from_config(cfg).checked(run, asked)


def _refuse_other_weights(run: Run, cfg: SampleConfig) -> None:
    """sample.checkpoint and sample.ema choose the weights a run is loaded with: asked of a run
    loaded with others, they would be ignored."""
    for key, wanted, loaded in (("checkpoint", str(cfg.checkpoint), str(run.loaded_as)),
                                ("ema", cfg.ema, run.ema)):
        if wanted != loaded:
            raise UserError(f"sample.{key}={wanted!r}, but {run.path} was loaded with "
                            f"{key}={loaded!r}: load it as asked (load_run(path, "
                            f"checkpoint=..., ema=...)) or leave sample.{key} as loaded")


def _job_identity(run: Run, cfg: SampleConfig, spec: SamplingSpec) -> dict:
    """What determines the pixels of image k. `num` is not part of it: a job may be extended."""
    return {"run": str(run.path.resolve()), "checkpoint": run.checkpoint,
            "checkpoint_sha256": run.checkpoint_sha256, "ema": run.ema, "seed": cfg.seed,
            "size": cfg.size, "training_images_sha256": RunDir(run.path).training_images_sha256(),
            **dataclasses.asdict(spec)}


def finished_rows(out: Path) -> dict[int, list[str]]:
    """Rows of a finished manifest and of every rank's partial one whose image is there; a torn
    last line (a crash mid-append), or one edited past reading, is not finished."""
    rows: dict[int, list[str]] = {}
    for path in [out / "manifest.csv", *sorted(out.glob(".manifest-rank*.csv"))]:
        for row in read_manifest(path, header=path.name == "manifest.csv"):
            if _finished(row, out):
                rows[int(row[1])] = row
    return rows


def _finished(row: list[str], out: Path) -> bool:
    """A manifest row naming its image by index, the image there, and (with --drop-copies) its
    nearest distance a number."""
    if len(row) not in (len(MANIFEST_COLUMNS), len(MANIFEST_COLUMNS) + 1) or not is_index(row[1]):
        return False
    if len(row) > len(MANIFEST_COLUMNS):
        try:
            if not math.isfinite(float(row[-1])):
                return False
        except ValueError:
            return False
    return row[0] == f"individual/{int(row[1]):06d}.png" and (out / row[0]).is_file()


class _Writer:
    """PNG encoding and writing on background threads, so sampling never waits on them. Rows of a
    batch reach the partial manifest only after all its images are written and fsynced."""

    def __init__(self, out: Path, rank: int, threads: int):
        self.out, self.pool = out, ThreadPoolExecutor(max_workers=max(1, threads))
        # opened with the first row: a job that made no image leaves no file
        self.path, self.manifest = out / f".manifest-rank{rank}.csv", None
        _cut_torn_tail(self.path)  # a crash mid-append: the next row starts on a line of its own
        self.pending: list[tuple[list[Future], list[list]]] = []
        self.committed = 0

    def submit(self, images: torch.Tensor, rows: list[list], text: dict) -> None:
        futures = [self.pool.submit(_write_png, self.out / row[0], img, text)
                   for img, row in zip(images, rows)]
        self.pending.append((futures, rows))
        self._commit(block=len(self.pending) > MAX_PENDING_BATCHES)

    def _commit(self, block: bool) -> None:
        while self.pending and (block or all(f.done() for f in self.pending[0][0])):
            futures, rows = self.pending.pop(0)
            for f in futures:
                try:
                    f.result()
                except OSError as exc:  # disk full: unwritten images' rows never reach the manifest
                    raise UserError(
                        f"cannot write images to {self.out}: {exc.strerror or exc}; "
                        f"{self.committed} finished images are kept, rerun to continue") from None
            for row in rows:
                atomic.fsync_file(self.out / row[0])
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(map(escaped, rows))
            self.manifest = self.manifest or atomic.open_in_place(self.path, "a")
            self.manifest.write(buf.getvalue())
            self.manifest.flush()
            os.fsync(self.manifest.fileno())
            self.committed += len(rows)
            block = False

    def close(self) -> None:
        while self.pending:
            self._commit(block=True)
        self.pool.shutdown()
        if self.manifest:
            self.manifest.close()


def _cut_torn_tail(path: Path) -> None:
    """Drop an unfinished last line (no newline) that a killed process left in an append-only
    file."""
    if path.exists() or path.is_symlink():
        with atomic.open_in_place(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


def _write_png(path: Path, img: torch.Tensor, text: dict) -> None:
    atomic.write_bytes(path, png_bytes(img, text), fsync=False)


def generate(run: Run, cfg: SampleConfig, *, log=print, fresh: bool = False, world: World = World(),
             amp_dtype: torch.dtype | None = None, progress: bool = True,
             asked: set[str] | None = None, force: bool = False,
             copies: CopyFilter | None = None, anchors: Anchors | None = None) -> Path:
    """Write cfg.num images into cfg.out_dir in the standard layout; returns the folder. Under
    torchrun every rank calls this and generates its share of the unfinished indices. `asked`: the
    sample.* keys the user gave (options they name that the sampler ignores are refused; default:
    those that differ from the run's own). `copies`: near-copies of training images are drawn
    again (--drop-copies). `anchors`: each image varies a real one (balance --from-real)."""
    expect(run, Run, "generate() takes a run loaded by ddpmkit.load_run(path)")
    expect(cfg, SampleConfig, "generate()'s cfg is a SampleConfig (load_config(...).sample)")
    _refuse_other_weights(run, cfg)
    spec = _checked(run, cfg, asked)
    if anchors:
        spec = anchors.checked(spec, run.schedule.num_timesteps)
    side = cfg.size or run.image_size
    batch = min(cfg.batch_size, cfg.num)
    network = sampling_bytes(run.config.model, run.image_size) * (2 if spec.guidance != 1 else 1)
    check_memory(batch * (3 * run.channels * side * side * 4 + network),
                 f"a batch of {batch} images of {side}x{side} through the network",
                 "lower --batch-size or --size")
    out = Path(cfg.out_dir)
    refuse_runs_data(out, run.path, run.config.data.path)
    identity = _job_identity(run, cfg, spec)
    if copies:
        identity["drop_copies"] = {"threshold": copies.calibration.threshold,
                                   "redraws": copies.redraws}
    if anchors:
        identity["from_real"] = anchors.identity
    folder = (OutputFolder(out, SAMPLE, identity, fresh, force) if world.is_main
              else contextlib.nullcontext())
    with folder:
        barrier()
        finished = finished_rows(out)
        unfinished = [k for k in range(cfg.num) if k not in finished]
        if finished and world.is_main:
            log(f"resuming: {len([k for k in finished if k < cfg.num])} of {cfg.num} images "
                f"already in {out}")
        _sample_into(run, cfg, spec, unfinished[world.rank::world.size], amp_dtype=amp_dtype,
                     rank=world.rank, progress=progress, copies=copies, anchors=anchors)
        barrier()
        if world.is_main:
            _finish(run, cfg, spec, len(unfinished), log, anchors)
    if copies and world.is_main:
        _report_copies(copy_summary(out, cfg.num, cfg.seed, copies), log)
    return out


def copy_summary(out: Path, num: int, seed: int, copies: CopyFilter) -> dict:
    """What --drop-copies did to a job's `num` images: how many were drawn again (their seed is
    not the job's) and how many are still near-copies."""
    rows = [row for k, row in finished_rows(out).items() if k < num]
    cal = copies.calibration
    left = int(is_copy(np.array([float(r[-1]) for r in rows if r[-1]]), cal.threshold).sum())
    return {"images": len(rows), "redrawn": sum(r[2] != str(seed) for r in rows),
            "copies_left": left, **cal.summary(), "max_redraws": copies.redraws}


def _report_copies(summary: dict, log) -> None:
    left, threshold = summary["copies_left"], summary["threshold"]
    log(f"near-copies: {summary['redrawn']} of {summary['images']} image(s) drawn again (the "
        f"manifest's seed column); " + (
            f"{left} still closer than {threshold:.4f} to a training image after "
            f"{summary['max_redraws']} redraws (its nearest column)" if left else
            f"none left (threshold {threshold:.4f}, calibrated {summary['calibrated_on']})"))


def _draw(run: Run, indices: list[int], seed: int, spec: SamplingSpec, amp_dtype,
          copies: CopyFilter | None, *, anchors: Anchors | None = None
          ) -> tuple[torch.Tensor, list[int], list[str]]:
    """Images `indices` as [-1, 1] floats; with `copies`, a near-copy of a training image is drawn
    again with the seed mix_seed(seed, attempt). Returns the images, the seed each was made with,
    and each one's distance to its nearest training image ('' unless checked)."""
    x = sample_batch(run, indices, seed, spec, amp_dtype, anchors=anchors)
    if not torch.isfinite(x).all():
        raise UserError(f"sampling {run.path} ({run.checkpoint}) gave non-finite values: its "
                        f"weights or these options ({spec.sampler}, guidance {spec.guidance}) do "
                        f"not make images; nothing of this batch was written")
    seeds = [seed] * len(indices)
    if copies is None:
        return x, seeds, [""] * len(indices)
    d1 = copies.distances(copies.compared(x))
    for attempt in range(1, copies.redraws + 1):
        again = np.flatnonzero(is_copy(d1, copies.calibration.threshold))
        if not len(again):
            break
        redrawn = sample_batch(run, [indices[i] for i in again], mix_seed(seed, attempt), spec,
                               amp_dtype, anchors=anchors)
        x = x.clone()  # the samplers return inference tensors, which cannot be updated in place
        x[torch.from_numpy(again)] = redrawn
        d1[again] = copies.distances(copies.compared(redrawn))
        for i in again:
            seeds[i] = mix_seed(seed, attempt)
    return x, seeds, [f"{d:.6f}" for d in d1]


def _sample_into(run: Run, cfg: SampleConfig, spec: SamplingSpec, todo: list[int], *, amp_dtype,
                 rank: int, progress: bool, copies: CopyFilter | None,
                 anchors: Anchors | None) -> None:
    out = Path(cfg.out_dir)
    text = {"ddpmkit": "synthetic", "source": f"{run.path.name}/{run.checkpoint}",
            "sampler": f"{spec.sampler}-{spec.steps}"}
    writer = _Writer(out, rank, cfg.writers)
    bar = tqdm(total=len(todo), desc=f"sampling ({spec.sampler}, {spec.steps} steps)", unit="img",
               dynamic_ncols=True, disable=not progress)
    try:
        for start in range(0, len(todo), cfg.batch_size):
            indices = todo[start:start + cfg.batch_size]
            x, seeds, nearest = _draw(run, indices, cfg.seed, spec, amp_dtype, copies,
                                      anchors=anchors)
            images = to_uint8(upsample(x, cfg.size) if cfg.size else x)
            rows = [[f"individual/{k:06d}.png", k, s, spec.sampler, spec.steps, run.checkpoint,
                     manifest_label(run, k, spec), "true", *([d] if copies else [])]
                    for k, s, d in zip(indices, seeds, nearest)]
            writer.submit(images, rows, text)
            bar.update(len(indices))
    finally:
        bar.close()
        writer.close()


def _finish(run: Run, cfg: SampleConfig, spec: SamplingSpec, made: int, log,
            anchors: Anchors | None = None) -> None:
    out = Path(cfg.out_dir)
    rows = finished_rows(out)
    missing = [k for k in range(cfg.num) if k not in rows]
    if missing:
        raise UserError(f"{len(missing)} images missing from {out} after sampling "
                        f"(first: {missing[0]}); rerun the command")
    # the grids show the job's first images (an earlier, larger --num's too), in manifest order
    first = [read_image(out / rows[k][0]) for k in sorted(rows)[:64]]
    grids = []
    for side in GRID_SIDES:
        if len(first) >= side * side:
            grids.append(f"grid_{side}x{side}.png")
            grid = scale_for_viewing(make_grid(torch.stack(first[: side * side]), side))
            atomic.write_bytes(out / "grids" / grids[-1], png_bytes(grid), fsync=False)
    if cfg.gif:
        atomic.write_bytes(out / "trajectory.gif", trajectory_gif(run, cfg, spec, anchors),
                           fsync=False)
    # rows beyond --num stay listed if an earlier run of this job made more
    listed = [rows[k] for k in sorted(rows)]
    write_manifest(out / "manifest.csv", listed, manifest_columns(listed))
    for p in out.glob(".manifest-rank*.csv"):
        p.unlink()
    # the smallest grid needs 16 images: say so rather than name a folder that was not written
    grid_note = (f"grids {', '.join(grids)} to {out}/grids" if grids
                 else f"no grid (one needs at least {GRID_SIDES[0] ** 2} images)")
    if not made:
        done = f"all {cfg.num} images were already in {out}/individual"
    else:
        done = (f"wrote {made} image{'s' * (made != 1)} to {out}/individual"
                + (f" ({cfg.num - made} were there)" if made < cfg.num else ""))
    if len(rows) > cfg.num:
        done += f" (it holds {len(rows)}: an earlier run of this job made more)"
    log("; ".join([done, grid_note, f"manifest {out}/manifest.csv"]
                  + ([f"trajectory {out}/trajectory.gif"] if cfg.gif else [])))


def manifest_columns(rows: list[list]) -> list[str]:
    """The manifest's columns: `nearest` too where the job checked its images for copies."""
    checked = rows and len(rows[0]) > len(MANIFEST_COLUMNS)
    return MANIFEST_COLUMNS + (["nearest"] if checked else [])


def trajectory_gif(run: Run, cfg: SampleConfig, spec: SamplingSpec,
                   anchors: Anchors | None = None) -> bytes:
    """The first images (same noise as in the job) from noise to image, as a GIF of grids."""
    n = min(cfg.num, GIF_IMAGES)
    keep = {-1} | set(np.round(np.linspace(0, spec.steps - 1,
                                           min(GIF_FRAMES, spec.steps))).astype(int).tolist())
    frames = []

    def record(i, x, x0):
        if i in keep:
            imgs = x.clamp(-1, 1)
            frames.append(scale_for_viewing(make_grid(to_uint8(upsample(imgs, cfg.size)
                                                               if cfg.size else imgs))))

    sample_batch(run, range(n), cfg.seed, spec, callback=record, anchors=anchors)
    return gif_bytes(frames)
