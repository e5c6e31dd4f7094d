"""The training loss: what the network is asked to predict, and how far off it is.

A loss is `loss(net, schedule, prediction, x0, t, noise, labels) -> scalar`; a new one goes here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import Schedule


def diffusion_loss(net, schedule: Schedule, prediction: str, x0, t, noise, *,
                   labels=None) -> torch.Tensor:
    """Simple loss of Ho et al.: MSE between the network output and its target (eps, x0 or v)."""
    x_t = schedule.q_sample(x0, t, noise)
    out = net(x_t, t) if labels is None else net(x_t, t, labels)
    return F.mse_loss(out.float(), schedule.target(prediction, x0, noise, t))
