"""The training loss: what the network is asked to predict, and how far off it is.

A loss is `loss(net, schedule, prediction, x0, t, noise, *, labels, augment) -> scalar`; a new one
goes here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import Schedule


def diffusion_loss(net, schedule: Schedule, prediction: str, x0, t, noise, *, labels=None,
                   augment=None) -> torch.Tensor:
    """Simple loss of Ho et al.: MSE between the network output and its target (eps, x0 or v).
    `labels`: class indices of a class-conditional net; `augment`: augmentation labels."""
    x_t = schedule.q_sample(x0, t, noise)
    conditions = {k: v for k, v in (("labels", labels), ("augment", augment)) if v is not None}
    out = net(x_t, t, **conditions)
    return F.mse_loss(out.float(), schedule.target(prediction, x0, noise, t))
