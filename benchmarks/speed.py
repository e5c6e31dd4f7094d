"""Training and sampling throughput for the model presets on this machine. Prints JSON.

    python benchmarks/speed.py                    # both presets, on the default device
    python benchmarks/speed.py --preset small --device cuda

Training: full optimizer steps of ddpmkit's loop body (forward, loss, backward, clip, AdamW, EMA)
on random data; sampling: DDIM steps of the EMA network (images/s = batch / seconds per image for
`--sample-steps` steps). Each figure is the median of --repeats timed runs after warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.config import load_config  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.generation import SamplingSpec, sample_batch  # noqa: E402
from ddpmkit.runtime import autocast, autocast_dtype, resolve_device  # noqa: E402
from ddpmkit.schedule import Schedule  # noqa: E402
from ddpmkit.loss import diffusion_loss  # noqa: E402
from ddpmkit.unet import UNet, count_parameters  # noqa: E402

CASES = {  # preset -> (image size, channels, train batch, sample batch) sized for a 2-core CPU
    "small": (8, 1, 128, 256),
    "ddpm-cifar10": (32, 3, 8, 8),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(preset: str, device: torch.device, repeats: int, sample_steps: int,
          gpu_batch: int | None) -> dict:
    size, channels, train_batch, sample_batch_size = CASES[preset]
    if device.type == "cuda" and gpu_batch:
        train_batch = sample_batch_size = gpu_batch
    cfg = load_config(None, {"model.preset": preset, "model.in_channels": channels,
                             "data.image_size": size})
    model = UNet(cfg.model, size).to(device)
    ema = UNet(cfg.model, size).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        model, ema = (model.to(memory_format=torch.channels_last),
                      ema.to(memory_format=torch.channels_last))
    amp = autocast_dtype("auto", device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    schedule = Schedule.from_config(cfg.diffusion)
    x0 = torch.randn(train_batch, channels, size, size, device=device)
    params, ema_params = list(model.parameters()), list(ema.parameters())

    def train_step():
        t = torch.randint(0, 1000, (train_batch,), device=device)
        with autocast(device, amp):
            loss = diffusion_loss(model, schedule, "eps", x0, t, torch.randn_like(x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1e-3)

    train_sec = _median_time(train_step, device, repeats)
    view = Run(Path("."), cfg, ema, schedule, 0, "")
    spec = SamplingSpec(sampler="ddim", steps=sample_steps).checked(view)
    sample_sec = _median_time(lambda: sample_batch(view, list(range(sample_batch_size)), 0, spec),
                              device, max(1, repeats // 2), warmup=1)
    return {
        "preset": preset, "parameters": count_parameters(model), "image_size": size,
        "channels": channels, "train_batch": train_batch,
        "train_images_per_sec": round(train_batch / train_sec, 2),
        "sample_batch": sample_batch_size, "sample_steps": sample_steps,
        "sample_images_per_sec": round(sample_batch_size / sample_sec, 3),
        "precision": "fp32" if amp is None else str(amp).replace("torch.", ""),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=list(CASES), action="append")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sample-steps", type=int, default=50)
    ap.add_argument("--gpu-batch", type=int, default=128, help="batch for both presets on CUDA")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    results = [bench(p, device, args.repeats, args.sample_steps, args.gpu_batch)
               for p in args.preset or list(CASES)]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(json.dumps({"device": str(device), "machine": machine, "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))


if __name__ == "__main__":
    main()
