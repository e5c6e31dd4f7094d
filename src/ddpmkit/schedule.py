"""Noise schedules and the forward process.

Notation (Ho et al. 2020): x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps, t = 0..T-1, where
abar_t = prod_{s<=t} (1 - beta_s). The network predicts eps, x0 or
v = sqrt(abar) eps - sqrt(1-abar) x0 (Salimans & Ho 2022); every conversion between them is
exact given x_t and t.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import DiffusionConfig

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")  # what the network outputs


def linear_betas(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    # Taken as given (as diffusers does), so imported schedules map one to one; DiffusionConfig's
    # defaults are what scale with T.
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal 2021: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), betas clipped at 0.999.
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)


def x0_eps_from_output(prediction: str, out, x_t, sa, sb):
    """Network output -> (x0, eps), given sqrt(abar) and sqrt(1 - abar) (scalars or tensors)."""
    if prediction == "eps":
        return (x_t - sb * out) / sa, out
    if prediction == "x0":
        return out, (x_t - sa * out) / sb
    return sa * x_t - sb * out, sb * x_t + sa * out  # v


class Schedule:
    """The alpha-bar table and everything derived from it. Tables are float64 for exact math;
    the per-sample coefficients are returned as float32 on the input's device.

    Samplers also see the schedule in continuous time: sigma(t) = sqrt((1 - abar) / abar) (the
    noise level in the variance-exploding view, x / sqrt(abar) = x0 + sigma * eps) is interpolated
    linearly in log-sigma between integer steps, as k-diffusion does, so fractional timesteps
    (Karras spacing) have an exact abar."""

    def __init__(self, betas: np.ndarray):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.log_sigmas = 0.5 * np.log((1.0 - self.alphas_cumprod)
                                       / self.alphas_cumprod)  # increasing
        self._abar = torch.from_numpy(self.alphas_cumprod).float()
        self._abar_on: dict[torch.device, torch.Tensor] = {}  # per-device copies: no host syncs

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> Schedule:
        if cfg.schedule == "linear":
            return cls(linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end))
        return cls(cosine_betas(cfg.num_timesteps))

    def sigma_at(self, t: float) -> float:
        return float(np.exp(np.interp(t, np.arange(self.num_timesteps), self.log_sigmas)))

    def t_at_sigma(self, sigma: float) -> float:
        return float(np.interp(np.log(sigma), self.log_sigmas, np.arange(self.num_timesteps)))

    def abar_at(self, t: float) -> float:
        """alpha-bar at a (possibly fractional) timestep; exact table values at integers."""
        if float(t).is_integer():
            return float(self.alphas_cumprod[int(t)])
        return 1.0 / (1.0 + self.sigma_at(t) ** 2)

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha-bar at integer timesteps t (shape B), broadcast to `like`'s rank."""
        table = self._abar_on.get(t.device)
        if table is None:
            table = self._abar_on[t.device] = self._abar.to(t.device)
        return table[t.long()].to(like.device).view(-1, *([1] * (like.dim() - 1)))

    def _coefs(self, t, like):
        a = self.abar(t, like)
        return a.sqrt(), (1 - a).sqrt()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | float,
                 noise: torch.Tensor) -> torch.Tensor:
        """x_t of the forward process: t an integer timestep per image (training), or one possibly
        fractional timestep for the whole batch (restoration)."""
        if isinstance(t, torch.Tensor):
            sa, sb = self._coefs(t, x0)
        else:
            a = self.abar_at(t)
            sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
        return sa * x0.float() + sb * noise

    def target(self, prediction: str, x0, noise, t) -> torch.Tensor:
        """What the network is trained to output."""
        if prediction == "eps":
            return noise
        if prediction == "x0":
            return x0
        sa, sb = self._coefs(t, x0)
        return sa * noise - sb * x0  # v
