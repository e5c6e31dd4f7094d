"""Sampling from a trained run: in memory (`sample`) or into the output layout (`generate`).

Output layout, shared by every command that writes images:

    OUT/individual/000000.png ...   one PNG per image, named by its index
    OUT/grids/grid_4x4.png ...      4x4, 6x6, 8x8 grids of the first images (those that fit)
    OUT/manifest.csv                file, index, seed, sampler, steps, checkpoint, label, synthetic
    OUT/trajectory.gif              with --gif: the first images denoising from noise
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch
from tqdm import tqdm

from . import atomic
from .config import SampleConfig
from .errors import UserError
from .images import gif_bytes, make_grid, png_bytes, scale_for_viewing, to_uint8, upsample
from .run import Run
from .samplers import DEFAULT_STEPS, SAMPLERS, Callback, Denoiser, ImageNoise, make_timesteps

MANIFEST_COLUMNS = ["file", "index", "seed", "sampler", "steps", "checkpoint", "label", "synthetic"]
GRID_SIDES = (4, 6, 8)
GIF_IMAGES, GIF_FRAMES = 16, 40


def resolved_steps(sampler: str, steps: int | None, num_timesteps: int) -> int:
    return steps or DEFAULT_STEPS[sampler] or num_timesteps


def sample_batch(run: Run, indices: list[int], seed: int, sampler: str = "ddim", steps: int | None = None,
                 spacing: str = "uniform", eta: float = 0.0, variance: str = "small", clip_x0: bool = True,
                 callback: Callback | None = None) -> torch.Tensor:
    """Images `indices` as [-1, 1] floats on the run's device; image k depends only on (seed, k)."""
    device = next(run.net.parameters()).device
    shape = (run.channels, run.image_size, run.image_size)
    noise = ImageNoise(seed, indices, shape, device)
    denoiser = Denoiser(run.net, run.schedule, run.config.diffusion.prediction, clip_x0)
    T = run.schedule.num_timesteps
    timesteps = make_timesteps(resolved_steps(sampler, steps, T), T, spacing)
    options = {"variance": variance} if sampler == "ddpm" else {"eta": eta}
    return SAMPLERS[sampler](denoiser, noise(), timesteps, noise, callback=callback, **options)


def sample(run: Run, num: int = 16, seed: int = 0, batch_size: int = 256, size: int | None = None,
           **options) -> torch.Tensor:
    """Notebook API: `num` images as uint8 N x C x H x W (options as in `sample_batch`)."""
    out = []
    for start in range(0, num, batch_size):
        x = sample_batch(run, list(range(start, min(num, start + batch_size))), seed, **options)
        out.append(to_uint8(upsample(x, size) if size else x))
    return torch.cat(out)


def prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file: choose a folder name with --out")
    (out / "individual").mkdir(parents=True, exist_ok=True)


class _Trajectory:
    """Collects frames of the first images while the first batch is sampled."""

    def __init__(self, n_images: int, n_steps: int, size: int | None):
        self.n, self.size, self.frames = n_images, size, []
        self.keep = set(torch.linspace(0, n_steps - 1, min(GIF_FRAMES, n_steps)).round().long().tolist())

    def __call__(self, i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if i in self.keep:
            imgs = x[: self.n].clamp(-1, 1)
            self.frames.append(make_grid(to_uint8(upsample(imgs, self.size) if self.size else imgs)))


def generate(run: Run, cfg: SampleConfig, log=print) -> Path:
    """Write cfg.num images into cfg.out_dir in the standard layout; returns the folder."""
    if cfg.num <= 0:
        raise UserError(f"--num must be at least 1, got {cfg.num}")
    out = Path(cfg.out_dir)
    prepare_out_dir(out)
    steps = resolved_steps(cfg.sampler, cfg.steps, run.schedule.num_timesteps)
    text = {"ddpmkit": "synthetic", "source": f"{run.path.name}/{run.checkpoint}", "sampler": f"{cfg.sampler}-{steps}"}
    options = dict(sampler=cfg.sampler, steps=steps, spacing=cfg.spacing, eta=cfg.eta,
                   variance=cfg.variance, clip_x0=cfg.clip_x0)
    trajectory = _Trajectory(min(cfg.num, GIF_IMAGES), steps, cfg.size) if cfg.gif else None
    rows, first = [], []
    bar = tqdm(total=cfg.num, desc=f"sampling ({cfg.sampler}, {steps} steps)", unit="img", dynamic_ncols=True)
    for start in range(0, cfg.num, cfg.batch_size):
        indices = list(range(start, min(cfg.num, start + cfg.batch_size)))
        x = sample_batch(run, indices, cfg.seed, callback=trajectory if start == 0 else None, **options)
        images = to_uint8(upsample(x, cfg.size) if cfg.size else x)
        for k, img in zip(indices, images):
            name = f"individual/{k:06d}.png"
            atomic.write_bytes(out / name, png_bytes(img, text), fsync=False)
            rows.append([name, k, cfg.seed, cfg.sampler, steps, run.checkpoint, "", "true"])
        first.extend(images[: max(0, 64 - len(first))])
        bar.update(len(indices))
    bar.close()

    for side in GRID_SIDES:
        if len(first) >= side * side:
            grid = make_grid(torch.stack(first[: side * side]), side)
            atomic.write_bytes(out / "grids" / f"grid_{side}x{side}.png", png_bytes(scale_for_viewing(grid)), fsync=False)
    if trajectory is not None:
        frames = [scale_for_viewing(f) for f in trajectory.frames]
        atomic.write_bytes(out / "trajectory.gif", gif_bytes(frames), fsync=False)
    write_manifest(out / "manifest.csv", rows)
    log(f"wrote {cfg.num} images to {out}/individual, grids to {out}/grids, manifest {out}/manifest.csv"
        + (f", trajectory {out}/trajectory.gif" if cfg.gif else ""))
    return out


def write_manifest(path: Path, rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue(), fsync=True)
