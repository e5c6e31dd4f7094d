"""`ddpmkit train --max-batch`: the largest micro-batch one training step fits in GPU memory.

The search (double until out of memory, then bisect) is separate from the step it tries, so it is
tested here with a simulated out-of-memory error; the probe itself needs a CUDA device.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import Config
from .errors import UserError
from .loss import diffusion_loss
from .resolve import architecture
from .runtime import autocast, autocast_dtype, resolve_device
from .schedule import Schedule
from .unet import UNet, check_fits


def largest_fitting(fits: Callable[[int], bool], start: int = 1, ceiling: int = 1 << 16) -> int:
    """The largest b in [start, ceiling] with fits(b), assuming fits is monotone
    (true up to a limit). Returns 0 when even `start` does not fit."""
    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None and good < ceiling:  # double: O(log b) tries
        candidate = min(good * 2, ceiling)
        if fits(candidate):
            good = candidate
        else:
            bad = candidate
    if bad is None:
        return good
    while bad - good > 1:  # bisect between the last fit and the first failure
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def probe(cfg: Config, log=print) -> dict:
    """Try full training steps (forward, backward, AdamW) of the configured model at growing batch
    sizes on the GPU; report the largest that fits and a grad_accum that reaches
    train.batch_size."""
    device = resolve_device(cfg.train.device)
    if device.type != "cuda":
        raise UserError("--max-batch measures GPU memory: "
                        "run it on a machine with a CUDA GPU (--device cuda)")
    # as training will find them (`info` reads them the same way)
    cfg, channels_from = architecture(cfg, log)
    amp = autocast_dtype(cfg.train.precision, device)
    # as training lays it out
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    check_fits(cfg.model, cfg.data.image_size, device, batch=1)
    model = UNet(cfg.model, cfg.data.image_size).to(device, memory_format=fmt)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-9, fused=True)
    schedule = Schedule.from_config(cfg.diffusion)
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)

    def fits(b: int) -> bool:
        try:
            x0 = torch.randn((b, *shape), device=device).contiguous(memory_format=fmt)
            t = torch.randint(0, schedule.num_timesteps, (b,), device=device)
            with autocast(device, amp):
                loss = diffusion_loss(model, schedule, cfg.diffusion.prediction,
                                      x0, t, torch.randn_like(x0))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            log(f"  batch {b}: fits "
                f"({torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak)")
            return True
        except torch.cuda.OutOfMemoryError:
            log(f"  batch {b}: out of memory")
            return False
        finally:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    best = largest_fitting(fits)
    if best == 0:
        raise UserError("even a batch of 1 does not fit: "
                        "set train.activation_checkpointing=true or use a smaller model")
    accum = -(-cfg.train.batch_size // best)
    while cfg.train.batch_size % accum:
        accum += 1
    return {"device": torch.cuda.get_device_name(device), "max_micro_batch": best,
            "batch_size": cfg.train.batch_size, "suggested_grad_accum": accum,
            "channels": cfg.model.in_channels, "channels_from": channels_from,
            "note": "per process; keep some headroom "
                    "(sampling grids and evaluation also use memory)"}
