"""Sampling speed, ddpmkit against diffusers, side by side in one run. Prints JSON.

Both sample the DDPM CIFAR-10 architecture (random weights) with DDIM (eta 0)
for the same number of steps and batch: diffusers as `UNet2DModel` + `DDIMScheduler` in its own
loop, ddpmkit through `sample_batch` (per-image seeded noise included). Median of --repeats runs,
alternating the two so drift on the machine hits both.

--bf16 puts both networks' weights in bf16, as `ddpmkit sample` does on a GPU and as diffusers'
docs load pipelines (torch_dtype=torch.bfloat16; its latents and scheduler run in bf16 too).
--channels-last applies to diffusers alone, whose docs advise it: ddpmkit samples in NCHW, which
its eager GroupNorms run faster in (RESULTS.md).

    pip install diffusers            # only this benchmark (and the interop tests) need it
    python benchmarks/sample_speed.py                      # CPU: batch 8, 10 steps
    python benchmarks/sample_speed.py --device cuda --batch 256 --steps 50 --bf16 --channels-last
    python benchmarks/sample_speed.py ... --compile reduce-overhead
        # both compiled, with CUDA graphs

--job reproduces the skin-lesion seed's job on a GPU: 5,900 images at 64x64 with 50 DDIM steps
from a UNet of base 128, mult 1,2,4,4 and attention at 16, timed once for each (RESULTS says
which network each figure used).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.config import COMPILE_MODES, load_config  # noqa: E402
from ddpmkit.generation import SamplingSpec, sample_batch  # noqa: E402
from ddpmkit.runtime import compile_network  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.schedule import Schedule  # noqa: E402
from ddpmkit.unet import UNet, count_parameters  # noqa: E402

CIFAR = dict(size=32, preset="ddpm-cifar10", block_out=(128, 256, 256, 256),
             down=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
             up=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
JOB = dict(size=64, preset=None, block_out=(128, 256, 512, 512),
           down=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
           up=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))


def build(arch: dict, device, channels_last: bool):
    """ddpmkit's and diffusers' networks for `arch`, equal parameter counts checked; channels_last
    is for diffusers' network only."""
    from diffusers import UNet2DModel

    size = arch["size"]
    overrides = {"model.in_channels": 3, "data.image_size": size, "model.dropout": 0.0}
    if arch["preset"]:
        overrides["model.preset"] = arch["preset"]
    else:
        base = arch["block_out"][0]
        overrides.update({"model.preset": None, "model.base_channels": base,
                          "model.attention_resolutions": [16],
                          "model.channel_mult": [c // base for c in arch["block_out"]]})
    cfg = load_config(None, overrides)
    ours = UNet(cfg.model, size).to(device).eval().requires_grad_(False)
    theirs = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=2,
                         block_out_channels=arch["block_out"], down_block_types=arch["down"],
                         up_block_types=arch["up"], attention_head_dim=None, norm_eps=1e-6,
                         downsample_padding=0, flip_sin_to_cos=False,
                         freq_shift=1).to(device).eval().requires_grad_(False)
    assert count_parameters(ours) == count_parameters(theirs), (count_parameters(ours),
                                                                count_parameters(theirs))
    if channels_last:
        theirs = theirs.to(memory_format=torch.channels_last)
    return cfg, ours, theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                    help="torch.compile both networks (optionally in a mode: reduce-overhead adds "
                         "CUDA graphs)")
    ap.add_argument("--job", action="store_true", help="the 5,900-image 64x64 job instead (GPU)")
    args = ap.parse_args()
    from diffusers import DDIMScheduler, __version__ as diffusers_version

    device = torch.device(args.device)
    arch = JOB if args.job else CIFAR
    cfg, ours, theirs = build(arch, device, args.channels_last)
    amp = torch.bfloat16 if args.bf16 else None
    if amp:
        ours, theirs = ours.to(amp), theirs.to(amp)
    if args.compile:  # diffusers as its docs compile it; ours as `ddpmkit sample` does
        ours = compile_network(ours, args.compile, for_sampling=True)
        theirs = compile_network(theirs, args.compile)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              timestep_spacing="linspace")
    view = Run(Path("."), cfg, ours, Schedule.from_config(cfg.diffusion), 0, "")
    size = arch["size"]

    scheduler.set_timesteps(args.steps)
    # the network gets them on its device: no copy per step
    timesteps_on_device = scheduler.timesteps.to(device)

    def run_diffusers(n):
        x = torch.randn(n, 3, size, size, device=device, dtype=amp)
        if args.channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            for t, t_net in zip(scheduler.timesteps, timesteps_on_device):
                x = scheduler.step(theirs(x, t_net).sample, t, x).prev_sample
        return x

    spec = SamplingSpec(sampler="ddim", steps=args.steps, eta=0.0).checked(view)

    def run_ours(n):
        return sample_batch(view, list(range(n)), 0, spec, amp_dtype=amp)

    def timed(fn, n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(n)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    result = {"device": where,
              "torch": torch.__version__, "diffusers": diffusers_version,
              "date": time.strftime("%Y-%m-%d"), "parameters": count_parameters(ours),
              "image_size": size, "steps": args.steps,
              "precision": "bf16 weights" if amp else "fp32",
              "diffusers_channels_last": args.channels_last, "compile": args.compile}
    if args.job:
        total, batch = 5900, args.batch
        for fn in (run_ours, run_diffusers):
            for n in {batch, total % batch} - {0}:
                fn(n)  # warm-up (and compilation, for the last, smaller batch too)
        secs = {}
        for name, fn in (("ddpmkit", run_ours), ("diffusers", run_diffusers)):
            secs[name] = sum(timed(fn, min(batch, total - i)) for i in range(0, total, batch))
        result.update({"job": "5,900 images", "batch": batch,
                       "ddpmkit_seconds": round(secs["ddpmkit"], 1),
                       "diffusers_seconds": round(secs["diffusers"], 1),
                       "speedup": round(secs["diffusers"] / secs["ddpmkit"], 3)})
    else:
        for fn in (run_ours, run_diffusers):
            fn(args.batch)
        times = {"ddpmkit": [], "diffusers": []}
        for _ in range(args.repeats):
            times["ddpmkit"].append(timed(run_ours, args.batch))
            times["diffusers"].append(timed(run_diffusers, args.batch))
        med = {k: statistics.median(v) for k, v in times.items()}
        result.update({"batch": args.batch, "repeats": args.repeats,
                       "ddpmkit_images_per_sec": round(args.batch / med["ddpmkit"], 3),
                       "diffusers_images_per_sec": round(args.batch / med["diffusers"], 3),
                       "ratio": round(med["diffusers"] / med["ddpmkit"], 3)})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
