"""Restoration with a trained model: denoising, img2img (SDEdit) and inpainting (RePaint).

Scales. Images enter and leave as uint8 N x C x H x W; the model works on [-1, 1]. A user's noise
level `sigma` is on the [0, 1] image scale, so on the model scale it is 2 * sigma.

Denoising. A noisy image y = x + s * n (model scale, n ~ N(0, I)) has the same law as the
diffusion's x_t / sqrt(abar_t) = x0 + sqrt((1 - abar_t) / abar_t) * eps at the (fractional) timestep
t where sqrt((1 - abar_t) / abar_t) = s. So x_t = sqrt(abar_t) * y is an exact sample of the forward
process at t, and
  - method 'mmse':   one network evaluation gives E[x0 | x_t] (Tweedie), the posterior mean: the
                     estimate with the least mean squared error (if the network is exact);
  - method 'sample': the reverse process from t to 0 draws from p(x0 | y); averaging `samples`
                     draws tends to the posterior mean, one draw is sharper but noisier.

img2img (SDEdit, Meng et al. 2022): noise the input to t = strength * (T - 1) with the forward
process, then run a sampler from t to 0. strength 0 returns the input unchanged; strength 1 starts
from (almost) pure noise and ignores the input.

Inpainting (RePaint, Lugmayr et al. 2022): mask white = unknown (to fill), black = known. Every
reverse step x_t -> x_{t-1} takes the unknown pixels from the model's ancestral step and the known
pixels from the forward process applied to the known image at t-1; every `jump_length` steps the
state is noised forward again by `jump_length` steps and the stretch redone (`resamplings` times in
all), which lets the filled region agree with the known one. The known pixels of the result are
the input's own uint8 values.

Randomness: image k of an input list draws its noise from its own generator seeded by (seed, k)
(samplers.ImageNoise), so results do not depend on the batch size or on which batch an image was in.
A folder's images are keyed by their file names instead: an image restored alone, or beside other
files, comes out the same.

Sizes: an image must have the model's channel count and at least its size on both sides; a larger
one (any shape) is restored tile by tile at every network call (tiling.py), never resized. Smaller
images and other channel counts are refused with a UserError.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .data import HIDDEN, batch_to_model, refuse_non_utf8_names, resize_center_crop
from .errors import UserError
from .images import make_grid, png_bytes, scale_for_viewing, to_uint8
from .outputs import (Kind, OutputFolder, about_images, existing, inside, read_record,
                      refuse_runs_data, write_manifest)
from .limits import check_memory
from .pixels import IMAGE_SUFFIXES, read_image, read_image_files, read_mask
from .run import Run
from .runtime import mix_seed
from .samplers import (SAMPLERS, Denoiser, ImageNoise, ancestral_step, sampler_named,
                       sdedit_start, timesteps_from)
from .schedule import Schedule
from .tiling import OVERLAP_FRACTION, TiledNet, tile_starts
from .unet import sampling_bytes

KINDS = ("denoise", "img2img", "inpaint")
METHODS = ("mmse", "sample")
MANIFEST_COLUMNS = ["input", "output", "kind", "seed", "sigma", "parameters"]
INPAINT_STEPS = 250  # RePaint's default
GRID_MAX_COLUMNS = 16  # the before/after grid shows at most this many image pairs
_INT_SNAP = 1e-9  # timesteps this close to an integer are that integer (exact table values)


# ---------------------------------------------------------------------------------------------
# Noise level <-> timestep

def sigma_range(schedule: Schedule) -> tuple[float, float]:
    """The smallest and largest noise level the schedule covers, on the [0, 1] image scale."""
    return math.exp(schedule.log_sigmas[0]) / 2, math.exp(schedule.log_sigmas[-1]) / 2


def sigma_to_timestep(schedule: Schedule, sigma: float) -> float:
    """The (fractional) timestep whose noise level equals `sigma` ([0, 1] image scale).

    y = x + sigma * n on [0, 1] is x + 2 * sigma * n on the model's [-1, 1], and x_t / sqrt(abar_t)
    = x0 + sqrt((1 - abar_t) / abar_t) * eps, so t solves sqrt((1 - abar_t) / abar_t) = 2 * sigma;
    then x_t = sqrt(abar_at(t)) * y. Schedule.t_at_sigma inverts the schedule's own log-sigma
    interpolation, so abar_at(t) reproduces sigma exactly; results within 1e-9 of an integer are
    snapped to it so table values (and integer network timesteps) are used there."""
    lo, hi = sigma_range(schedule)
    if not (lo * (1 - 1e-9) <= sigma <= hi * (1 + 1e-9)):
        raise UserError(f"noise level sigma={sigma:g} is outside what this model's schedule covers "
                        f"([{lo:.4g}, {hi:.4g}] on the [0,1] scale)")
    t = schedule.t_at_sigma(2.0 * sigma)
    return float(round(t)) if abs(t - round(t)) < _INT_SNAP else t


# ---------------------------------------------------------------------------------------------
# Noise estimation

def estimate_sigma(images) -> list[float]:
    """Per-image Gaussian noise level on the [0, 1] scale, from the median absolute deviation of
    the finest diagonal wavelet coefficients (Donoho & Johnstone 1994, via scikit-image).
    `images`: uint8 N x C x H x W (0..255), or floats N x C x H x W already on the [0, 1] scale.
    Noisy images that were clipped to [0, 1] (most saved files) read low where they saturate."""
    try:  # optional dependencies, imported only when an estimate is asked for
        import pywt  # noqa: F401  (scikit-image's wavelet code needs it but does not install it)
        from skimage.restoration import estimate_sigma as _wavelet_sigma
    except ImportError:
        raise UserError(
            "estimating the noise level (sigma auto) needs scikit-image and PyWavelets: "
            "pip install scikit-image PyWavelets, or give the noise level as a number") from None
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    arr = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    with warnings.catch_warnings():  # a flat channel has no wavelet detail: its estimate is NaN,
        warnings.simplefilter("ignore", RuntimeWarning)  # read as no measurable noise
        return [float(np.mean([np.nan_to_num(_wavelet_sigma(channel)) for channel in img]))
                for img in arr]  # one estimate per channel, averaged


# ---------------------------------------------------------------------------------------------
# Building blocks on model-scale tensors (any Denoiser, e.g. an exact one in tests)

def _to_images(run: Run, x: torch.Tensor) -> torch.Tensor:
    """uint8 images; non-finite values (broken weights) are refused, never written as black."""
    if not torch.isfinite(x).all():
        raise UserError(f"{run.path} ({run.checkpoint}) gave non-finite values: its weights do "
                        f"not make images; nothing was written")
    return to_uint8(x)


def _sigma_list(sigma, n: int) -> list[float]:
    try:
        s = ([float(v) for v in sigma]
             if isinstance(sigma, (list, tuple, np.ndarray, torch.Tensor)) else [float(sigma)] * n)
    except ValueError:
        raise UserError(f"--sigma {sigma}: give the noise's standard deviation on the [0, 1] "
                        f"scale (e.g. 0.1), or auto") from None
    if len(s) != n:
        raise UserError(f"{len(s)} noise levels given for {n} images")
    return s


def _require_stochastic(sampler: str) -> None:
    if not sampler_named(sampler).stochastic:
        stochastic = [name for name, info in SAMPLERS.items() if info.stochastic]
        raise UserError(
            f"denoising by sampling draws from p(x | y), which needs a stochastic sampler "
            f"({' or '.join(stochastic)}): {sampler!r} is deterministic, every draw would "
            f"be the same image and not a sample; for one best estimate use the mmse method")


def denoise_tensor(denoiser: Denoiser, y: torch.Tensor, sigma, method: str = "mmse",
                   samples: int = 1, seed: int = 0, *, indices: Sequence[int] | None = None,
                   sampler: str = "ddpm", steps: int | None = None) -> torch.Tensor:
    """Denoise model-scale images y = x + 2*sigma*n ([-1, 1] floats, N x C x H x W); `sigma` on the
    [0, 1] scale, one number or one per image. Returns model-scale floats (not clipped).
    `indices`: the images' positions in the whole job, which seed their noise (default 0..N-1)."""
    if method not in METHODS:
        raise UserError(f"unknown denoising method {method!r} (known: {', '.join(METHODS)})")
    if samples < 1:
        raise UserError(f"samples must be at least 1, got {samples}")
    if method == "sample":
        _require_stochastic(sampler)
    indices = list(range(len(y))) if indices is None else list(indices)
    sigmas = _sigma_list(sigma, len(y))
    out = torch.empty_like(y, dtype=torch.float32)
    # The denoiser takes one t per batch: images sharing a noise level go through together.
    for s in sorted(set(sigmas)):
        rows = [i for i, v in enumerate(sigmas) if v == s]
        t = sigma_to_timestep(denoiser.schedule, s)
        x_t = math.sqrt(denoiser.schedule.abar_at(t)) * y[rows].float()
        if method == "mmse":
            out[rows] = denoiser(x_t, t)[0]
            continue
        acc = torch.zeros_like(x_t)
        for k in range(samples):  # draw k of image i uses the generator of (seed, k, i)
            noise = ImageNoise(mix_seed(seed, k), [indices[i] for i in rows], tuple(x_t.shape[1:]),
                               x_t.device)
            acc += sampler_named(sampler)(denoiser, x_t, timesteps_from(t, steps), noise)
        out[rows] = acc / samples
    return out


def img2img_tensor(denoiser: Denoiser, x0: torch.Tensor, strength: float, seed: int = 0, *,
                   indices: Sequence[int] | None = None, sampler: str = "ddim",
                   steps: int | None = None) -> torch.Tensor:
    """SDEdit on model-scale images: forward-noise to t = strength * (T - 1) (fractional t allowed:
    the schedule's log-sigma interpolation gives its abar), then sample back to t = 0 with `steps`
    network calls (None: every integer timestep below t). strength 0 returns x0 itself."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return x0
    indices = list(range(len(x0))) if indices is None else list(indices)
    noise = ImageNoise(seed, indices, tuple(x0.shape[1:]), x0.device)
    x_t, timesteps = sdedit_start(denoiser.schedule, x0, strength, noise, steps)
    return sampler_named(sampler)(denoiser, x_t, timesteps, noise)


MAX_RESAMPLINGS = 1000


def _check_jumps(jump_length: int, resamplings: int) -> None:
    if jump_length < 1 or resamplings < 1:
        raise UserError(f"--jump-length and --resamplings must be at least 1, "
                        f"got {jump_length} and {resamplings}")
    if resamplings > MAX_RESAMPLINGS:  # each one repeats every jump: the schedule grows with it
        raise UserError(f"--resamplings {resamplings:,}: at most {MAX_RESAMPLINGS:,} (RePaint uses "
                        f"10)")


def repaint_schedule(levels: int, jump_length: int, resamplings: int) -> list[int]:
    """The sequence of levels RePaint visits (its get_schedule_jump): levels-1 down to -1 (the
    clean image), going back up `jump_length` levels after every `jump_length` levels down,
    `resamplings - 1` times at each such point. A step down is a reverse step, up a forward one."""
    _check_jumps(jump_length, resamplings)
    jumps = {j: resamplings - 1 for j in range(0, levels - jump_length, jump_length)}
    t, seq = levels, []
    while t >= 1:
        t -= 1
        seq.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                seq.append(t)
    seq.append(-1)
    return seq


def inpaint_tensor(denoiser: Denoiser, x_known: torch.Tensor, fill: torch.Tensor, seed: int = 0, *,
                   indices: Sequence[int] | None = None, steps: int | None = None,
                   jump_length: int = 10, resamplings: int = 10) -> torch.Tensor:
    """RePaint on model-scale images. `fill`: bool N x 1 x H x W (or N x C x H x W), True where the
    pixel is unknown. Reverse steps are DDPM ancestral steps (posterior variance) on `steps` evenly
    spaced integer timesteps (None, or more than T: all T); network calls are about
    steps * resamplings."""
    s = denoiser.schedule
    if steps is not None and steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    n_levels = s.num_timesteps if steps is None else min(steps, s.num_timesteps)
    # level -> timestep
    grid = np.unique(np.round(np.linspace(0, s.num_timesteps - 1, n_levels))).astype(int)

    def abar(level: int) -> float:
        return 1.0 if level < 0 else float(s.alphas_cumprod[grid[level]])

    indices = list(range(len(x_known))) if indices is None else list(indices)
    noise = ImageNoise(seed, indices, tuple(x_known.shape[1:]), x_known.device)
    fill = fill.to(x_known.device).expand_as(x_known)
    x0 = x_known.float()

    def known_at(level):  # the known image pushed through the forward process to this level
        return x0 if level < 0 else s.q_sample(x0, float(grid[level]), noise())

    top = len(grid) - 1
    x = torch.where(fill, noise(), known_at(top))
    seq = repaint_schedule(len(grid), jump_length, resamplings)
    for cur, nxt in zip(seq, seq[1:]):
        a_cur, a_nxt = abar(cur), abar(nxt)
        if nxt < cur:  # reverse step cur -> nxt: ancestral for the unknown, forward for the known
            x0_hat, _ = denoiser(x, float(grid[cur]))
            x = torch.where(fill, ancestral_step(x, x0_hat, a_cur, a_nxt, noise), known_at(nxt))
        else:  # forward jump cur -> nxt: q(x_nxt | x_cur)
            ratio = a_nxt / a_cur
            x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise()
    return x


# ---------------------------------------------------------------------------------------------
# uint8 API on a trained run

def _denoiser(run: Run, images: torch.Tensor, clip_x0: bool = True,
              tile_batch: int = 64) -> Denoiser:
    """The run's denoiser for these images: tile by tile (tiling.py, `tile_batch` tiles per network
    call) when they are larger than the model's training size."""
    net = run.net if images.shape[-2:] == (run.image_size, run.image_size) else \
        TiledNet(run.net, run.image_size, chunk=tile_batch)
    return Denoiser(net, run.schedule, run.config.diffusion.prediction, clip_x0)


def check_images(run: Run, images_u8: torch.Tensor, names: Sequence[str] | None = None) -> None:
    """Refuse images the model cannot take: wrong dtype or channel count, or smaller than its size
    (larger ones are restored tile by tile)."""
    if images_u8.dtype != torch.uint8 or images_u8.dim() != 4:
        raise UserError(f"expected uint8 images N x C x H x W, got {images_u8.dtype} "
                        f"of shape {tuple(images_u8.shape)}")
    c, h, w = images_u8.shape[1:]
    size = run.image_size
    if c != run.channels or min(h, w) < size:
        name = names[0] if names else "the images"
        raise UserError(f"{name}: {c} channel(s), {w}x{h} pixels, but the model takes "
                        f"{run.channels} channel(s) at {size}x{size} or larger (restored tile by "
                        f"tile): convert or upscale it first (no silent resizing)")


def denoise(run: Run, images_u8: torch.Tensor, sigma="auto", method: str = "mmse", samples: int = 1,
            seed: int = 0, *, steps: int | None = None, sampler: str = "ddpm", clip_x0: bool = True,
            indices: Sequence[int] | None = None, tile_batch: int = 64) -> torch.Tensor:
    """Denoise uint8 images (N x C x H x W, the model's size or larger) whose noise level is `sigma`
    on the [0, 1] scale: a number, one per image, or 'auto' (estimate_sigma per image, raised to the
    schedule's smallest level). method 'mmse': posterior mean, one network call; 'sample': reverse
    process from the matched t with `sampler` and `steps` (None: all integer steps below t),
    averaged over `samples` draws. Returns uint8."""
    check_images(run, images_u8)
    sig = resolve_sigma(run.schedule, images_u8, sigma)
    y = batch_to_model(images_u8).to(run.device)
    x = denoise_tensor(_denoiser(run, y, clip_x0, tile_batch), y, sig, method, samples, seed,
                       indices=indices, sampler=sampler, steps=steps)
    return _to_images(run, x)


def resolve_sigma(schedule: Schedule, images_u8: torch.Tensor, sigma) -> list[float]:
    """'auto' -> the per-image estimate, clamped into the schedule's range (an almost clean image
    gets the smallest level); numbers are used as given (refused when out of range)."""
    if isinstance(sigma, str):
        if sigma != "auto":
            try:
                sigma = float(sigma)
            except ValueError:
                raise UserError(f"sigma must be 'auto' or a number, got {sigma!r}") from None
        else:
            lo, hi = sigma_range(schedule)
            return [min(max(s, lo), hi) for s in estimate_sigma(images_u8)]
    return _sigma_list(sigma, len(images_u8))


def img2img(run: Run, images_u8: torch.Tensor, strength: float = 0.5, seed: int = 0,
            sampler: str = "ddim", steps: int | None = None, *, clip_x0: bool = True,
            indices: Sequence[int] | None = None, tile_batch: int = 64) -> torch.Tensor:
    """SDEdit: t = strength * (T - 1), forward-noise, sample back with `sampler` in `steps` network
    calls (None: the sampler's default, capped at the integer steps below t). strength 0 is the
    identity (the input tensor's values, bit for bit). Returns uint8."""
    check_images(run, images_u8)
    if strength == 0:
        return images_u8.clone()
    steps = steps if steps is not None else sampler_named(sampler).default_steps
    x = img2img_tensor(
        _denoiser(run, images_u8, clip_x0, tile_batch), batch_to_model(images_u8).to(run.device),
        strength, seed, indices=indices, sampler=sampler, steps=steps)
    return _to_images(run, x)


def inpaint(run: Run, images_u8: torch.Tensor, masks: torch.Tensor, seed: int = 0, *,
            steps: int | None = INPAINT_STEPS, jump_length: int = 10, resamplings: int = 10,
            clip_x0: bool = True, indices: Sequence[int] | None = None,
            tile_batch: int = 64) -> torch.Tensor:
    """RePaint. `masks`: bool (or 0/255 uint8) N x 1 x H x W, True/white where the pixel is unknown.
    steps: reverse steps on evenly spaced timesteps, capped at T (None: all T). The default 250 with
    jump_length = resamplings = 10 is the paper's setting (it used T = 250); network calls are about
    steps * resamplings (2,500 per image by default).
    Known pixels of the result are the input's uint8 values exactly. Returns uint8."""
    check_images(run, images_u8)
    fill = masks.bool() if masks.dtype != torch.uint8 else masks > 127
    if fill.dim() != 4 or fill.shape[0] != images_u8.shape[0] \
            or fill.shape[-2:] != images_u8.shape[-2:] \
            or fill.shape[1] not in (1, images_u8.shape[1]):
        raise UserError(f"masks of shape {tuple(fill.shape)} do not fit "
                        f"images of shape {tuple(images_u8.shape)}")
    x = inpaint_tensor(
        _denoiser(run, images_u8, clip_x0, tile_batch), batch_to_model(images_u8).to(run.device),
        fill, seed, indices=indices, steps=steps, jump_length=jump_length, resamplings=resamplings)
    # The known pixels are the input's exactly (not a float round trip of them).
    return torch.where(fill.expand_as(images_u8), _to_images(run, x), images_u8)


# ---------------------------------------------------------------------------------------------
# Folder runner

@dataclass(frozen=True)
class Restoration:
    """One restoration job's settings (what `ddpmkit denoise|img2img|inpaint` take), checked
    once."""
    kind: str
    masks_dir: str | Path | None = None  # inpaint: masks named like the images, white = fill
    sigma: object = "auto"  # denoise: a number on the [0, 1] scale, one per image, or 'auto'
    method: str = "mmse"  # denoise: mmse | sample
    samples: int = 1  # denoise --method sample: draws averaged
    strength: float = 0.5  # img2img
    sampler: str | None = None  # None: ddpm for denoise, ddim for img2img
    # None: denoise 'sample' all steps below t, img2img its sampler's default, inpaint 250
    steps: int | None = None
    jump_length: int = 10  # inpaint
    resamplings: int = 10  # inpaint
    seed: int = 0
    batch_size: int = 64  # images, or tiles of a larger image, per network call
    clip_x0: bool = True

    def checked(self) -> Restoration:
        if self.kind not in KINDS:
            raise UserError(f"unknown restoration {self.kind!r} (known: {', '.join(KINDS)})")
        if self.kind == "inpaint" and self.masks_dir is None:
            raise UserError("inpainting needs a folder of masks (white = fill), "
                            "matched to the images by file name")
        for name, value in (("batch size", self.batch_size), ("steps", self.steps),
                            ("samples", self.samples)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be at least 1, got {value}")
        if self.seed < 0:
            raise UserError(f"--seed must not be negative, got {self.seed}")
        if self.kind == "inpaint":
            _check_jumps(self.jump_length, self.resamplings)
        if self.kind == "denoise" and self.method == "mmse" and (
                self.steps is not None or self.samples != 1 or self.sampler is not None):
            raise UserError("--method mmse is one network call: --steps, --samples and --sampler "
                            "are for --method sample")
        if self.kind == "img2img" and not 0 <= self.strength <= 1:
            raise UserError(f"--strength must be in [0, 1] (0 returns the input, 1 ignores it), "
                            f"got {self.strength}")
        sampler = self.sampler or {"denoise": "ddpm", "img2img": "ddim"}.get(self.kind)
        if sampler is not None:
            sampler_named(sampler)
        if self.kind == "denoise" and self.method == "sample":  # before a folder is claimed
            _require_stochastic(sampler)
        steps = self.steps
        if steps is None and self.kind == "inpaint":
            steps = INPAINT_STEPS
        elif steps is None and self.kind == "img2img":
            steps = sampler_named(sampler).default_steps
        sigma = self.sigma  # "0.1" and "0.10" are one job
        if isinstance(sigma, str) and sigma != "auto" and self.kind == "denoise":
            sigma = _sigma_list(sigma, 1)[0]
        return replace(self, sampler=sampler, steps=steps, sigma=sigma)

    def on_schedule(self, schedule: Schedule) -> Restoration:
        """The steps as they run, so the manifest says what ran and 250 and 5,000 asked of a
        1,000-step schedule are one job: img2img's at most the integers below its t, inpainting's
        and denoise sampling's at most the schedule's."""
        if self.kind != "img2img" and self.steps is not None:
            return replace(self, steps=min(self.steps, schedule.num_timesteps))
        if self.kind != "img2img" or self.strength == 0:
            return self
        t = self.strength * (schedule.num_timesteps - 1)
        return replace(self, steps=len(timesteps_from(t, self.steps)))

    def check_levels(self, schedule: Schedule, count: int) -> None:
        """Given noise levels against what the run's schedule covers, before a folder is claimed."""
        if self.kind == "denoise" and not (isinstance(self.sigma, str) and self.sigma == "auto"):
            for sigma in set(_sigma_list(self.sigma, count)):
                sigma_to_timestep(schedule, sigma)

    def identity(self, run: Run, inputs: Path, files: list[Path], images: list[torch.Tensor],
                 masks: list[torch.Tensor] | None) -> dict:
        """What determines the job's files: its output folder's record. The inputs' (and masks')
        pixels are part of it: an input changed since an interrupted run is another job."""
        sigma = (self.sigma if isinstance(self.sigma, str)
                 else np.asarray(self.sigma, dtype=float).tolist())
        return {"run": str(run.path.resolve()), "checkpoint": run.checkpoint, "ema": run.ema,
                "kind": self.kind, "inputs": str(inputs.resolve()),
                "files": {p.name: _pixels_digest(img, None if masks is None else masks[i])
                          for i, (p, img) in enumerate(zip(files, images))}, "seed": self.seed,
                "parameters": self.parameters(),
                **({"sigma": sigma} if self.kind == "denoise" else {}),
                **({"masks": str(Path(self.masks_dir).resolve())} if self.masks_dir else {})}

    def parameters(self) -> dict:
        """What the manifest records of the job."""
        if self.kind == "denoise":
            p = {"method": self.method,
                 **({"samples": self.samples, "sampler": self.sampler, "steps": self.steps}
                    if self.method == "sample" else {})}
        elif self.kind == "img2img":
            p = {"strength": self.strength, "sampler": self.sampler, "steps": self.steps}
        else:
            p = {"steps": self.steps, "jump_length": self.jump_length,
                 "resamplings": self.resamplings}
        return {**p, "clip_x0": self.clip_x0}

    def run_on(self, run: Run, batch: torch.Tensor, masks: torch.Tensor | None,
               idx: list[int]) -> torch.Tensor:
        """This job on one batch of uint8 images (`idx`: the indices that seed their noise)."""
        common = dict(indices=idx, tile_batch=self.batch_size, clip_x0=self.clip_x0)
        if self.kind == "denoise":
            return denoise(run, batch, self.sigma, self.method, self.samples, self.seed,
                           steps=self.steps, sampler=self.sampler, **common)
        if self.kind == "img2img":
            return img2img(run, batch, self.strength, self.seed, self.sampler, self.steps, **common)
        return inpaint(run, batch, masks, self.seed, steps=self.steps, jump_length=self.jump_length,
                       resamplings=self.resamplings, **common)


def _input_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        raise UserError(f"{folder} is a file: give the folder that holds the images")
    if not folder.is_dir():
        raise UserError(f"input folder not found: {folder}")
    files = sorted(p for p in folder.iterdir()  # hidden ones skipped, as data folders' are
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(HIDDEN)
                   and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {folder} "
                        f"(its subfolders are not searched)")
    refuse_non_utf8_names(files)
    stems = [p.stem for p in files]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise UserError(f"{folder} holds several images named {dup[0]}.* "
                        f"(outputs are PNGs named by the stem): rename one")
    return files


def read_inputs(run: Run, folder: Path) -> tuple[list[Path], list[torch.Tensor]]:
    """The folder's images, read as the run's training images were: wide (16-bit) values at the
    run's recorded bit depth when those were wide, else at the depth the folder's largest value
    needs."""
    files = _input_files(folder)
    depth = run.config.data.bit_depth if (run.config.data.bit_depth or 0) > 8 else None
    read = read_image_files(files, str(folder) if len(files) > 1 else str(files[0]),
                            bit_depth=depth, channels=run.channels,
                            depth_of=f"the images {run.path} was trained on")
    for path, img in zip(files, read.images):
        check_images(run, img[None], [str(path)])
    return files, read.images


def _check_memory(run: Run, images: list[torch.Tensor], batch_size: int) -> None:
    """Before the folder is claimed, for the batch of one shape that takes most: its images as
    floats (input, noisy and restored images, the noise, the tiles' sums and weights, and a few in
    between), and the network's activations for the images or tiles of one call."""
    per_image = sampling_bytes(run.config.model, run.image_size)
    overlap = run.image_size // OVERLAP_FRACTION
    needs = []
    for shape, count in Counter(tuple(img.shape) for img in images).items():
        tiles = math.prod(len(tile_starts(side, run.image_size, overlap)) for side in shape[-2:])
        batch = min(batch_size, count)
        calls = min(batch_size, batch * tiles)
        needs.append((batch * math.prod(shape) * 4 * 16 + calls * per_image, batch, shape, calls))
    need, batch, shape, calls = max(needs)
    check_memory(need, f"a batch of {batch} image(s) of {shape[-1]}x{shape[-2]} and {calls} "
                       f"images or tiles per network call", "lower --batch-size")


def _batches_of_one_size(images: list[torch.Tensor], batch_size: int,
                         skip: Sequence = ()) -> list[list[int]]:
    """Indices of the images in batches of at most batch_size images of one shape each, leaving out
    those whose entry in `skip` is not None."""
    by_shape: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        if i >= len(skip) or skip[i] is None:
            by_shape.setdefault(tuple(img.shape), []).append(i)
    return [idx[k:k + batch_size] for idx in by_shape.values()
            for k in range(0, len(idx), batch_size)]


def load_masks(masks_dir: Path, files: list[Path],
               images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The mask of each image (named like it, white = fill) as bool 1 x H x W."""
    if masks_dir.is_file():
        raise UserError(f"--mask {masks_dir} is a file: give the folder of masks, each named like "
                        f"its image")
    if not masks_dir.is_dir():
        raise UserError(f"mask folder not found: {masks_dir} (--mask: a folder of masks named "
                        f"like the images)")
    masks = []
    for image, img in zip(files, images):
        found = [masks_dir / (image.stem + s) for s in [image.suffix, *sorted(IMAGE_SUFFIXES)]]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            expected = " or ".join(dict.fromkeys([image.name, f"{image.stem}.png"]))
            raise UserError(f"no mask for {image.name} in {masks_dir} (expected {expected})")
        mask = read_mask(path)
        if mask.shape[-2:] != img.shape[-2:]:
            raise UserError(f"mask {path} is {mask.shape[2]}x{mask.shape[1]} pixels but its image "
                            f"is {img.shape[2]}x{img.shape[1]}")
        masks.append(mask)
    return masks


def restore_folder(run: Run, kind: str, inputs_dir, out_dir, *, log: Callable[[str], None] = print,
                   fresh: bool = False, force: bool = False, **options) -> Path:
    """Restore every image of `inputs_dir` into `out_dir` (`options`: Restoration's):
        OUT/individual/<input stem>.png   one output per input
        OUT/grid.png                      inputs (top row) above outputs (bottom row), first 16
        OUT/manifest.csv                  input, output, kind, seed, sigma, parameters (JSON)
    Every file is written atomically; each image's noise depends only on (seed, its file name).
    A folder holding another restoration's outputs is refused unless `fresh`."""
    job = Restoration(kind, **{"clip_x0": run.config.sample.clip_x0, **options}).checked(
    ).on_schedule(run.schedule)
    files, images = read_inputs(run, Path(inputs_dir))
    job.check_levels(run.schedule, len(files))
    masks = load_masks(Path(job.masks_dir), files, images) if kind == "inpaint" else None
    unfilled = [f.name for f, m in zip(files, masks or []) if not m.any()]
    if unfilled:
        log(f"note: {len(unfilled)} mask(s) have no white (fill) pixel, {unfilled[0]}'s first: "
            f"those images come back unchanged")
    out, text = Path(out_dir), {"ddpmkit": kind, "source": f"{run.path.name}/{run.checkpoint}"}
    reads = (Path(inputs_dir),) + ((Path(job.masks_dir),) if masks else ())
    refuse_runs_data(out, run.path, run.config.data.path)
    _check_memory(run, images, job.batch_size)
    identity = job.identity(run, Path(inputs_dir), files, images, masks)
    with OutputFolder(out, RESTORE, identity, fresh, force, reads):
        outputs, sigmas = _finished(out, files, images), [""] * len(files)  # a rerun resumes
        done = sum(o is not None for o in outputs)
        if done:
            log(f"resuming: {done} of {len(files)} images already in {out}")
        for i in (i for i, done in enumerate(outputs) if done is not None and kind == "denoise"):
            sigmas[i] = resolve_sigma(run.schedule, images[i][None], job.sigma)[0]
        for idx in _batches_of_one_size(images, job.batch_size, skip=outputs):
            batch = torch.stack([images[i] for i in idx])
            part = job
            if kind == "denoise":  # resolved here, so the manifest records each image's level
                part = replace(job, sigma=resolve_sigma(run.schedule, batch, job.sigma))
                for i, s in zip(idx, part.sigma):
                    sigmas[i] = s
            masks_of = None if masks is None else torch.stack([masks[i] for i in idx])
            keys = [_noise_key(files[i].name) for i in idx]
            for i, img in zip(idx, part.run_on(run, batch, masks_of, keys)):
                atomic.write_bytes(out / _output_of(files[i].name),
                                   png_bytes(img, text), fsync=False)
                outputs[i] = img
        _write_summary(out, files, images, outputs, sigmas, job)
    if kind == "denoise" and job.sigma == "auto":
        _say_clamped(run, sigmas, log)
    log(f"{kind}: wrote {len(files)} images to {out}/individual, before/after grid {out}/grid.png, "
        f"manifest {out}/manifest.csv")
    return out


def _say_clamped(run: Run, sigmas: list[float], log) -> None:
    """Estimates outside the noise the model was trained to remove are denoised at its edge."""
    lo, hi = sigma_range(run.schedule)
    low, high = sum(s == lo for s in sigmas), sum(s == hi for s in sigmas)
    if low:
        log(f"denoise: note: {low} image(s) look cleaner than the least noise {run.path} was "
            f"trained to remove (sigma {lo:.4g}): denoised at that level (the manifest's sigma)")
    if high:
        log(f"denoise: note: {high} image(s) look noisier than the most noise {run.path} was "
            f"trained on (sigma {hi:.4g}): denoised at that level (the manifest's sigma)")


def _finished(out: Path, files: list[Path], images: list[torch.Tensor]
              ) -> list[torch.Tensor | None]:
    """Per input, the output an interrupted run of this same job wrote (each written whole and
    depending only on the job and the file's name), else None; one of another shape than its
    input is not what this job writes, and is made again."""
    found = [read_image(out / _output_of(f.name)) if (out / _output_of(f.name)).is_file() else None
             for f in files]
    return [done if done is not None and done.shape == image.shape else None
            for done, image in zip(found, images)]


def _pixels_digest(image: torch.Tensor, mask: torch.Tensor | None) -> str:
    """What an input (and its mask) holds, shape included, in 128 bits: enough to tell a changed
    input, and short enough for a record of half a million of them."""
    digest = hashlib.sha256(repr(tuple(image.shape)).encode() + image.numpy().tobytes())
    if mask is not None:
        digest.update(mask.numpy().tobytes())
    return digest.hexdigest()[:32]


def _output_of(name: str) -> str:
    """Where an input file's restored image goes, relative to the output folder."""
    return f"individual/{Path(name).stem}.png"


def _noise_key(name: str) -> int:
    """The index that seeds an input image's noise, from its file name alone."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def _write_summary(out: Path, files: list[Path], images: list, outputs: list, sigmas: list,
                   job: Restoration) -> None:
    """The before/after grid (inputs above outputs) and the manifest."""
    n = min(len(files), GRID_MAX_COLUMNS)
    shown = min(min(img.shape[-2:]) for img in images[:n])  # others: centre squares of this side
    grid = make_grid(torch.cat([resize_center_crop(img[None], shown)
                                for img in [*images[:n], *outputs[:n]]]), ncol=n)
    atomic.write_bytes(out / "grid.png", png_bytes(scale_for_viewing(grid)), fsync=False)
    seed = "" if job.kind == "denoise" and job.method == "mmse" else job.seed  # draws no noise
    rows = [[str(p), _output_of(p.name), job.kind, seed, f"{s:.6g}" if s != "" else "",
             json.dumps(job.parameters())] for p, s in zip(files, sigmas)]
    write_manifest(out / "manifest.csv", rows, MANIFEST_COLUMNS)


def _restored_files(out: Path) -> list[Path]:
    """An earlier restoration's own files: the outputs its record names (one written before a
    crash is in no manifest yet), its grid and manifest, and what audit and eval wrote about
    them."""
    names = (read_record(out) or {"job": {}})["job"].get("files")
    outputs = [inside(out, _output_of(name))
               for name in (names if isinstance(names, dict) else {}) if isinstance(name, str)]
    return [p for p in outputs if p is not None and (p.is_file() or p.is_symlink())] + existing(
        out, ("grid.png", "manifest.csv")) + about_images(out)


RESTORE = Kind("restore", "restoration", "restored images",
               "files no ddpmkit restoration wrote there", _restored_files,
               lambda job: {"grid.png", "manifest.csv",
                            *map(_output_of, job["files"])}.__contains__)

