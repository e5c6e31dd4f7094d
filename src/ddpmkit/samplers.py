"""Samplers: plain functions with one signature over one denoiser interface.

    sampler(denoiser, x, timesteps, noise, callback=None, **options) -> x0

`denoiser(x_t, t) -> (x0_hat, eps_hat)` hides the network and its prediction type (eps, x0 or v),
so every sampler works for all three. `timesteps` is a descending list of integer steps (built by
`make_timesteps`, separate from the sampler). `noise()` returns fresh noise shaped like x, drawn
from per-image generators so an image never depends on which batch it was in.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .runtime import mix_seed
from .schedule import Schedule

Callback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, x_t, x0_hat)


class Denoiser:
    def __init__(self, net: torch.nn.Module, schedule: Schedule, prediction: str, clip_x0: bool = True):
        self.net, self.schedule, self.prediction, self.clip_x0 = net, schedule, prediction, clip_x0

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = self.net(x, tt).float()
        x0, eps = self.schedule.to_x0_eps(self.prediction, out, x, tt)
        if self.clip_x0:
            # Keep eps consistent with the clipped x0 (as guided-diffusion does).
            x0 = x0.clamp(-1, 1)
            eps = self.schedule.eps_from_x0(x, tt, x0)
        return x0, eps


class ImageNoise:
    """One generator per image, seeded from (seed, image index): noise for image k is the same
    whatever the batch size or position, and any image can be regenerated alone."""

    def __init__(self, seed: int, indices: list[int], shape: tuple[int, ...], device: torch.device | str):
        self.shape, self.device = shape, device
        self.generators = [torch.Generator().manual_seed(mix_seed(seed, k)) for k in indices]

    def __call__(self) -> torch.Tensor:
        draws = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(draws).to(self.device)


def make_timesteps(steps: int, num_timesteps: int, spacing: str = "uniform") -> list[int]:
    """Descending integer timesteps. uniform: evenly spaced over [0, T-1], both ends included
    (so sampling starts from pure noise); quadratic: denser near t=0 (DDIM paper, section 5)."""
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if spacing == "uniform":
        ts = np.round(np.linspace(0, T - 1, steps)).astype(int)
    elif spacing == "quadratic":
        ts = np.round(np.linspace(0, math.sqrt(T * 0.8), steps) ** 2).astype(int)
        for i in range(1, len(ts)):  # rounding can repeat small values: keep them strictly increasing
            ts[i] = max(ts[i], ts[i - 1] + 1)
    else:
        raise ValueError(f"unknown spacing {spacing!r}")
    return [int(t) for t in ts[::-1]]


def _alphas(schedule: Schedule, timesteps: list[int], i: int) -> tuple[float, float]:
    """(abar at this step, abar at the next one; 1.0 after the last: the clean image)."""
    a = schedule.alphas_cumprod
    return float(a[timesteps[i]]), float(a[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0


def ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps: list[int], noise: Callable[[], torch.Tensor],
         callback: Callback | None = None, variance: str = "small") -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020), on any subsequence of timesteps (respaced as in
    improved DDPM: beta_t = 1 - abar_t / abar_prev). variance: 'small' is the posterior variance
    beta~, 'large' is beta."""
    for i, t in enumerate(timesteps):
        a_t, a_prev = _alphas(denoiser.schedule, timesteps, i)
        beta = 1.0 - a_t / a_prev
        x0, _ = denoiser(x, t)
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
        if i + 1 < len(timesteps):
            var = beta * (1 - a_prev) / (1 - a_t) if variance == "small" else beta
            x = mean + math.sqrt(var) * noise()
        else:
            x = mean
        if callback:
            callback(i, x, x0)
    return x


def ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: list[int], noise: Callable[[], torch.Tensor],
         callback: Callback | None = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2021). eta=0 is deterministic; eta=1 matches DDPM's posterior variance."""
    for i, t in enumerate(timesteps):
        a_t, a_prev = _alphas(denoiser.schedule, timesteps, i)
        x0, eps = denoiser(x, t)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * noise()
        if callback:
            callback(i, x, x0)
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim}
DEFAULT_STEPS = {"ddpm": None, "ddim": 50}  # None: all T steps
