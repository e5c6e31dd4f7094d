"""Samplers: plain functions with one signature over one denoiser interface (k-diffusion's
factoring).

    sampler(denoiser, x, timesteps, noise, callback=None, **options) -> x0

`denoiser(x_t, t) -> (x0_hat, eps_hat)` hides the network and its prediction type (eps, x0 or v),
so every sampler works for all three. `timesteps` is a descending list of (possibly fractional)
timesteps from `make_timesteps`, separate from the sampler; after the last one each sampler steps to
the clean image. `noise()` returns fresh noise shaped like x, drawn from per-image generators so an
image never depends on which batch it was in.

Network evaluations (NFE) per image: `len(timesteps)` for every sampler except heun (`nfe`).

`SAMPLERS` is the one registry of sampler names: the config, the CLI and the restoration commands
check names, default step counts and what a sampler is against it.

Against diffusers' schedulers (tests/test_interop.py): DDPM, DDIM, DPM-Solver++(2M) and Euler on
trailing timesteps agree with DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler and
EulerDiscreteScheduler to float32 rounding, clipping matched and started from the same x_T. The
conventions that differ: DPM-Solver++ takes a first-order step into t=0 whenever the spacing
reaches it (diffusers: lower_order_final, below 15 steps); Heun skips its correction on its first
step, from pure noise, as well as its last (2 * steps - 2 evaluations); Euler and Heun map x_T to
the variance-exploding view exactly, x_T * sqrt(1 + sigma_max^2), where diffusers starts at
sigma_max * x_T; timesteps may be fractional, the network seeing the fractional t and abar coming
from log-sigma interpolation; tables are float64, diffusers' float32; DDIM steps to the next
timestep of its own list, so on uneven spacings it matches no diffusers scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import UserError
from .runtime import autocast, mix_seed
from .schedule import Schedule, x0_eps_from_output

# (step index, x_t, x0_hat); generation.sample_batch first passes (-1, the starting x, None)
Callback = Callable[[int, torch.Tensor, torch.Tensor | None], None]


class Denoiser:
    """A network, its schedule and prediction type as one function (x_t, t) -> (x0, eps).
    The whole batch shares t, so the conversions use scalars.

    Class-conditional networks take `labels` (one class index per image, -1 for none) and
    classifier-free guidance: out = uncond + guidance * (cond - uncond), so 0 is the unconditional
    model, 1 the plain conditional one, and larger values push harder towards the class. The
    output is linear in eps, x0 and v alike, so guiding the raw output is guiding all three."""

    def __init__(self, net: torch.nn.Module, schedule: Schedule, prediction: str,
                 clip_x0: bool = True, *, amp_dtype: torch.dtype | None = None,
                 labels: torch.Tensor | None = None, guidance: float = 1.0):
        self.net, self.schedule, self.prediction, self.clip_x0 = net, schedule, prediction, clip_x0
        self.amp_dtype, self.labels, self.guidance = amp_dtype, labels, guidance
        # Weights in a low precision (load_run's dtype) take their inputs in it; fp32 ones autocast.
        weights = next(net.parameters(), torch.empty(0)).dtype
        self.input_dtype = weights if weights != torch.float32 else None

    def _output(self, x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        if self.labels is None:
            return self.net(x, tt).float()
        if self.guidance == 1.0:
            return self.net(x, tt, self.labels).float()
        none = torch.full_like(self.labels, -1)
        if self.guidance == 0.0:
            return self.net(x, tt, none).float()
        both = self.net(torch.cat([x, x]), torch.cat([tt, tt]),
                        torch.cat([self.labels, none])).float()
        cond, uncond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        if self.input_dtype is not None:
            out = self._output(x.to(self.input_dtype), tt)
        else:
            with autocast(x.device, self.amp_dtype):
                out = self._output(x, tt)
        a = self.schedule.abar_at(t)
        sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
        x0, eps = x0_eps_from_output(self.prediction, out, x, sa, sb)
        if self.clip_x0:
            # Keep eps consistent with the clipped x0 (as guided-diffusion does).
            x0 = x0.clamp(-1, 1)
            eps = (x - sa * x0) / sb
        return x0, eps


class ImageNoise:
    """One generator per image, seeded from (seed, image index): noise for image k is the same
    whatever the batch size or position, and any image can be regenerated alone."""

    def __init__(self, seed: int, indices: list[int], shape: tuple[int, ...],
                 device: torch.device | str):
        self.shape, self.device = shape, device
        self.generators = [torch.Generator().manual_seed(mix_seed(seed, k)) for k in indices]

    def __call__(self) -> torch.Tensor:
        draws = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(draws).to(self.device)


SPACINGS = ("uniform", "quadratic", "trailing", "karras")
KARRAS_SIGMA_MAX = 80.0  # EDM's for VP models: the cosine schedule's clipped betas go far above


def make_timesteps(steps: int, schedule_or_T: Schedule | int,
                   spacing: str = "uniform") -> list[float]:
    """Descending timesteps.
    uniform:   evenly spaced over [0, T-1], both ends included (starts from pure noise);
    quadratic: denser near t=0 (DDIM paper, section 5), from T-1;
    trailing:  T-1, T-1-T/n, ... (Lin et al. 2024): evenly spaced, starting at T-1, not reaching 0;
    karras:    noise levels sigma evenly spaced in sigma^(1/7) (Karras et al. 2022), fractional
               t; from T-1, then from sigma 80 where the schedule ends above it (EDM's sigma_max:
               the steps above it are all noise)."""
    T = schedule_or_T if isinstance(schedule_or_T, int) else schedule_or_T.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    if steps == 1 and spacing in ("uniform", "quadratic"):
        ts = np.array([T - 1.0])  # one step: from pure noise straight to the image
    elif spacing == "uniform":
        ts = np.round(np.linspace(0, T - 1, steps))
    elif spacing == "quadratic":
        # The DDIM code stops at 0.8 T, fine for linear betas (abar there 0.0015) but not for cosine
        # (0.093) when sampling starts from pure noise: this runs to T-1 instead.
        ts = np.round(np.linspace(0, math.sqrt(T - 1), steps) ** 2)
        for i in range(1, len(ts)):  # rounding can repeat small values: keep them strictly rising
            ts[i] = max(ts[i], ts[i - 1] + 1)
    elif spacing == "trailing":
        # by index, not np.arange over floats, which can return steps + 1 values (the last one -1)
        ts = (np.round(T - np.arange(steps) * (T / steps)) - 1)[::-1]
    elif spacing == "karras":
        if isinstance(schedule_or_T, int):
            raise ValueError("karras spacing needs the schedule, not just T")
        s = schedule_or_T
        lo, hi = math.exp(s.log_sigmas[0]), min(math.exp(s.log_sigmas[-1]), KARRAS_SIGMA_MAX)
        capped = hi < math.exp(s.log_sigmas[-1]) and steps > 1
        ramp = np.linspace(0, 1, steps - capped)
        sigmas = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
        ts = [float(T - 1)] * capped + [s.t_at_sigma(sig) for sig in sigmas]
        ts[-1], ts[0] = 0.0, float(T - 1)  # the ends exactly, not via exp and log (one step: T-1)
        return ts
    else:
        raise ValueError(f"unknown spacing {spacing!r} (known: {', '.join(SPACINGS)})")
    return [float(t) for t in ts[::-1]]


def sdedit_start(schedule: Schedule, x0: torch.Tensor, strength: float, noise: ImageNoise,
                 steps: int | None = None) -> tuple[torch.Tensor, list[float]]:
    """Where SDEdit (Meng et al. 2022) starts: x0 forward-noised to t = strength * (T - 1)
    (fractional t: the schedule interpolates), and the timesteps from t down (timesteps_from)."""
    t = strength * (schedule.num_timesteps - 1)
    return schedule.q_sample(x0, t, noise()), timesteps_from(t, steps)


def timesteps_from(t_start: float, steps: int | None = None) -> list[float]:
    """Descending timesteps from t_start (possibly fractional): t_start itself, then integer
    timesteps below it: all of them down to 0 (steps None), or `steps - 1` of them evenly spaced
    as in trailing spacing, t_start * (1 - k / steps) rounded, the last step going from about
    t_start / steps to the clean image. Each sampler steps to the clean image after the last
    timestep, so `steps` is the number of network calls. An integer less than half a step below
    t_start is skipped: solvers divide by the first step's width (DPM-Solver++'s ratio of steps)
    or take a root of its noise level's difference, which rounding can make negative."""
    below = np.arange(math.ceil(t_start) - 1, -1, -1, dtype=np.float64)  # integers < t_start
    if len(below) and t_start - below[0] < 0.5:
        below = below[1:]
    if steps is not None:
        if steps < 1:
            raise UserError(f"steps must be at least 1, got {steps}")
        if steps - 1 < len(below):
            # evenly spaced from t_start: no call is spent on a sliver of a step at either end
            grid = np.round(np.linspace(t_start, 0, steps + 1)[1:-1])
            below = np.unique(np.minimum(grid, below[0]))[::-1]
    return [float(t_start)] + [float(t) for t in below]


def _alphas(schedule: Schedule, timesteps: list[float], i: int) -> tuple[float, float]:
    """(abar at this step, abar at the next one; 1.0 after the last: the clean image)."""
    nxt = schedule.abar_at(timesteps[i + 1]) if i + 1 < len(timesteps) else 1.0
    return schedule.abar_at(timesteps[i]), nxt


def ancestral_step(x: torch.Tensor, x0: torch.Tensor, a_t: float, a_prev: float,
                   noise: Callable[[], torch.Tensor], variance: str = "small") -> torch.Tensor:
    """One reverse step x_t -> x_prev of Ho et al. 2020 (eq. 6-7): the posterior mean of
    q(x_prev | x_t, x0) plus noise of variance beta~ ('small') or beta ('large'), none into the
    clean image (a_prev = 1). Any two levels of the schedule: beta = 1 - abar_t / abar_prev
    respaces it (improved DDPM)."""
    beta = 1.0 - a_t / a_prev
    mean = ((math.sqrt(a_prev) * beta / (1 - a_t)) * x0
            + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x)
    if a_prev == 1.0:
        return mean
    var = beta * (1 - a_prev) / (1 - a_t) if variance == "small" else beta
    return mean + math.sqrt(var) * noise()


def ddpm(denoiser: Denoiser, x: torch.Tensor, timesteps: list[float],
         noise: Callable[[], torch.Tensor], callback: Callback | None = None,
         variance: str = "small") -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020) on any subsequence of timesteps. variance: 'small' is the
    posterior variance beta~, 'large' is beta."""
    for i, t in enumerate(timesteps):
        a_t, a_prev = _alphas(denoiser.schedule, timesteps, i)
        x0, _ = denoiser(x, t)
        x = ancestral_step(x, x0, a_t, a_prev, noise, variance)
        if callback:
            callback(i, x, x0)
    return x


def ddim(denoiser: Denoiser, x: torch.Tensor, timesteps: list[float],
         noise: Callable[[], torch.Tensor], callback: Callback | None = None,
         eta: float = 0.0) -> torch.Tensor:
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


def _lam(a: float) -> float:
    """log(alpha / sigma), DPM-Solver's time variable (half the log-SNR)."""
    return 0.5 * math.log(a / (1.0 - a))


def _dpmpp_2m(denoiser, x, timesteps, noise, callback, sde: bool):
    old_x0, h_last = None, None
    for i, t in enumerate(timesteps):
        a_s, a_t = _alphas(denoiser.schedule, timesteps, i)
        x0, _ = denoiser(x, t)
        if a_t == 1.0:  # last step: to the clean image, where lambda is infinite
            x = x0
        else:
            h = _lam(a_t) - _lam(a_s)
            alpha_t, sigma_t, sigma_s = math.sqrt(a_t), math.sqrt(1 - a_t), math.sqrt(1 - a_s)
            # second order from the previous x0 (multistep), except on the first step and on a step
            # into t=0: there uniform-in-t steps are tiny in lambda next to the one before, and the
            # extrapolation weight 1/(2r) would blow up (diffusers' final-step rule). Trailing
            # spacing stops short of t=0 and keeps second order to the end. "t=0" up to rounding:
            # Karras spacing reaches it through exp and log.
            lower = old_x0 is None or (i == len(timesteps) - 2 and round(timesteps[-1]) == 0)
            d = x0 if lower else x0 + (h / h_last) / 2 * (x0 - old_x0)  # 1/(2r), r = h_last/h
            if sde:
                x = (sigma_t / sigma_s * math.exp(-h)) * x + alpha_t * -math.expm1(-2 * h) * d \
                    + sigma_t * math.sqrt(-math.expm1(-2 * h)) * noise()
            else:
                x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
            old_x0, h_last = x0, h
        if callback:
            callback(i, x, x0)
    return x


def dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps: list[float],
             noise: Callable[[], torch.Tensor], callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): deterministic, second-order multistep in x0 space."""
    return _dpmpp_2m(denoiser, x, timesteps, noise, callback, sde=False)


def dpmpp_2m_sde(denoiser: Denoiser, x: torch.Tensor, timesteps: list[float],
                 noise: Callable[[], torch.Tensor],
                 callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (midpoint variant): the same multistep x0 estimate with fresh noise
    each step, which corrects earlier errors at the cost of needing more steps."""
    return _dpmpp_2m(denoiser, x, timesteps, noise, callback, sde=True)


def _karras_ode(denoiser, x, timesteps, callback, heun: bool):
    """Euler / Heun on the probability-flow ODE in the variance-exploding view, where
    x_ve = x_vp / sqrt(abar) and dx_ve / dsigma = (x_ve - x0) / sigma (Karras et al. 2022)."""
    s = denoiser.schedule
    sig = [s.sigma_at(t) for t in timesteps] + [0.0]

    def d_at(x_ve, i, t):
        x0, _ = denoiser(x_ve / math.sqrt(1 + sig[i] ** 2), t)
        return (x_ve - x0) / sig[i], x0

    x_ve = x * math.sqrt(1 + sig[0] ** 2)
    for i, t in enumerate(timesteps):
        d, x0 = d_at(x_ve, i, t)
        dt = sig[i + 1] - sig[i]
        # Heun corrects every step but the first and the last. The first starts from pure noise,
        # where x0 is the data mean and the path is straight in sigma; its sigma can be huge (the
        # cosine schedule's t=T-1 is sigma 20,291, against 15 one step later), and the trapezoid's
        # second slope would multiply the two x0 estimates' difference by sigma_0 / (2 sigma_1).
        if heun and i > 0 and sig[i + 1] > 0:
            x_pred = x_ve + d * dt
            d2, _ = d_at(x_pred, i + 1, timesteps[i + 1])
            x_ve = x_ve + (d + d2) / 2 * dt
        else:
            x_ve = x_ve + d * dt
        if callback:
            callback(i, x_ve / math.sqrt(1 + sig[i + 1] ** 2), x0)
    return x_ve


def euler(denoiser: Denoiser, x: torch.Tensor, timesteps: list[float],
          noise: Callable[[], torch.Tensor], callback: Callback | None = None) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the 2nd
    order)."""
    return _karras_ode(denoiser, x, timesteps, callback, heun=False)


def heun(denoiser: Denoiser, x: torch.Tensor, timesteps: list[float],
         noise: Callable[[], torch.Tensor], callback: Callback | None = None) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""
    return _karras_ode(denoiser, x, timesteps, callback, heun=True)


@dataclass(frozen=True)
class Sampler:
    """A sampler function and what the rest of ddpmkit needs to know about it."""
    fn: Callable[..., torch.Tensor]
    default_steps: int | None  # None: all T
    stochastic: bool  # draws p(x0 | x_t) (fresh noise each step) or solves the probability-flow ODE
    option: str | None = None  # its one keyword option, if any
    evaluations: Callable[[int], int] = lambda steps: steps  # network calls for `steps` steps

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.fn(*args, **kwargs)


SAMPLERS = {
    "ddpm": Sampler(ddpm, None, stochastic=True, option="variance"),
    "ddim": Sampler(ddim, 50, stochastic=False, option="eta"),
    "dpmpp-2m": Sampler(dpmpp_2m, 20, stochastic=False),
    "dpmpp-2m-sde": Sampler(dpmpp_2m_sde, 30, stochastic=True),
    "euler": Sampler(euler, 50, stochastic=False),
    # two evaluations a step, except the first's second (at sigma_max) and the last's (to 0)
    "heun": Sampler(heun, 25, stochastic=False, evaluations=lambda steps: max(2 * steps - 2, 1)),
}


def sampler_named(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations of `steps` steps of the sampler."""
    return sampler_named(sampler).evaluations(steps)
