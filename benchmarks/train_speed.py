"""Training speed, ddpmkit against diffusers, side by side in one run. Prints JSON.

Both train the same architecture (diffusers' `UNet2DModel` built with the configuration our UNet
mirrors; parameter counts asserted equal) on the same batch size, precision and memory format.

- ddpmkit: the real `ddpmkit train` loop (`ddpmkit.training.train`) on random uint8 images written
  to a temporary .npy, timed from its own stats.jsonl: images/s of `--repeats` log intervals of
  `--interval` steps after `--warmup` steps; median reported. That is what a user gets,
  per-step seeding, the NaN guard and the EMA included.
- diffusers: the loop of its own training examples at their best settings: `UNet2DModel`, MSE on
  the noise, `clip_grad_norm_`, fused AdamW, `EMAModel(foreach=True)`, bf16 autocast and
  channels_last on CUDA; timed over the same intervals.

Each arm runs in its own process, so peak memory (CUDA: max allocated; CPU: max RSS) is its own.

    pip install diffusers
    python benchmarks/train_speed.py                         # this CPU: fp32, batch 8
    python benchmarks/train_speed.py --device cuda --batch 128 --bf16 --channels-last
        [--compile [MODE]]
    python benchmarks/train_speed.py --arch all ...         # also the 64x64 network

Model-FLOPs utilisation (GPU): 3 x forward FLOPs (torch's FLOP counter) x images/s over the
device's dense bf16 peak (--peak-tflops, default 989 for an H100 SXM).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
# the same architectures, built the same way
from sample_speed import CIFAR, JOB, build  # noqa: E402
from ddpmkit.config import COMPILE_MODES  # noqa: E402
from ddpmkit.runtime import compile_network  # noqa: E402

ARCHS = {"cifar10": CIFAR, "64px": JOB}


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ddpmkit(args, arch: dict) -> dict:
    from ddpmkit.config import load_config
    from ddpmkit.training import train

    size = arch["size"]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images.npy"
        rng = np.random.default_rng(0)
        np.save(data,
                rng.integers(0, 256, (max(1024, args.batch * 4), size, size, 3), dtype=np.uint8))
        _, ours, _ = build(arch, "cpu", False)  # only for its config
        overrides = {f"model.{k}": v for k, v in vars(ours.cfg).items() if k not in ("preset",)}
        overrides.update({"model.preset": None, "model.dropout": 0.0,
                          "model.compile": bool(args.compile),
                          "model.compile_mode": args.compile or "default", "data.path": str(data),
                          "data.image_size": size, "train.batch_size": args.batch,
                          "train.max_steps": args.warmup + args.interval * args.repeats,
                          "train.log_every": args.interval, "train.sample_every": 10**9,
                          "train.checkpoint_every": 10**9, "train.device": args.device,
                          "train.precision": "bf16" if args.bf16 else "fp32",
                          "train.out_dir": str(Path(tmp) / "run"),
                          "train.channels_last": args.channels_last,
                          "train.warmup_steps": 1, "train.grid_images": 1, "train.grid_steps": 1})
        cfg = load_config(None, overrides)
        train(cfg, log=lambda *_: None, progress=False)
        lines = [json.loads(x)
                 for x in (Path(tmp) / "run" / "stats.jsonl").read_text().splitlines()]
    timed = [r for r in lines if r["step"] > args.warmup]
    return {"images_per_sec": statistics.median(r["images_per_sec"] for r in timed),
            "peak_memory_mb": max(r["memory_mb"] for r in lines)}


def run_diffusers(args, arch: dict) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    device = torch.device(args.device)
    _, _, unet = build(arch, device, args.channels_last)
    unet.train().requires_grad_(True)
    ema = EMAModel(unet.parameters(), decay=0.9999, foreach=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    model = compile_network(unet, args.compile) if args.compile else unet
    size, amp = arch["size"], torch.bfloat16 if args.bf16 else None
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randint(0, 256, (max(1024, args.batch * 4), 3, size, size), dtype=torch.uint8,
                           device=device)

    def step(i: int):
        x0 = (images[torch.randint(0, len(images), (args.batch,), device=device)].float()
              / 127.5 - 1)
        x0 = x0.contiguous(memory_format=fmt)
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = model(scheduler.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    rates = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        for i in range(args.interval):
            step(i)
        sync()
        rates.append(args.interval * args.batch / (time.perf_counter() - t0))
    return {"images_per_sec": statistics.median(rates), "peak_memory_mb": _peak_mb(device)}


def forward_gflops(arch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    _, ours, _ = build(arch, "meta", False)
    size = arch["size"]
    with FlopCounterMode(display=False) as counter:
        ours(torch.zeros(1, 3, size, size, device="meta"), torch.zeros(1, device="meta"))
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="cifar10", choices=[*ARCHS, "all"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=4,
                    help="untimed steps first (a multiple of --interval)")
    ap.add_argument("--interval", type=int, default=4, help="steps per timed interval")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true",
                    help="both arms (ddpmkit: train.channels_last); else NCHW")
    ap.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                    help="torch.compile both networks (optionally in a mode: reduce-overhead adds "
                         "CUDA graphs)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense bf16 peak of the GPU, for MFU")
    # one arm, in a child process
    ap.add_argument("--arm", choices=["ddpmkit", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--one-arch", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.arm:  # child: one measurement, JSON on the last line
        fn = run_ddpmkit if args.arm == "ddpmkit" else run_diffusers
        print(json.dumps(fn(args, ARCHS[args.one_arch])))
        return

    import diffusers

    device = torch.device(args.device)
    results = []
    for name in (ARCHS if args.arch == "all" else [args.arch]):
        row = {"arch": name, "image_size": ARCHS[name]["size"]}
        _, ours, _ = build(ARCHS[name], "cpu", False)
        row["parameters"] = sum(p.numel() for p in ours.parameters())
        for arm in ("ddpmkit", "diffusers"):
            child = [sys.executable, __file__, *sys.argv[1:], "--arm", arm, "--one-arch", name]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{arm} on {name} failed:\n{done.stderr[-3000:]}")
            row[arm] = json.loads(done.stdout.strip().splitlines()[-1])
        row["speedup"] = round(
            row["ddpmkit"]["images_per_sec"] / row["diffusers"]["images_per_sec"], 3)
        if device.type == "cuda":
            flops = 3 * forward_gflops(ARCHS[name]) * 1e9
            row["train_tflops_per_image"] = flops / 1e12
            for arm in ("ddpmkit", "diffusers"):
                row[arm]["mfu"] = round(
                    flops * row[arm]["images_per_sec"] / (args.peak_tflops * 1e12), 4)
        results.append(row)
    print(json.dumps({
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu, {torch.get_num_threads()} threads"),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "date": time.strftime("%Y-%m-%d"), "batch": args.batch,
        "precision": "bf16" if args.bf16 else "fp32", "channels_last": args.channels_last,
        "compile": args.compile,
        "timed": f"median of {args.repeats} intervals of {args.interval} steps after {args.warmup}",
        "results": results}, indent=1))


if __name__ == "__main__":
    main()
