"""One forward pass of ddpmkit's and diffusers' UNet, in each memory layout and precision.
Prints JSON.

Sampling time is forward passes, so this says which layout and precision to sample in, and whether
the two networks differ at all once the settings are equal. Each figure is the median of --repeats
timed forwards after 3 untimed ones (x random, every timestep 500). --groupnorm also times one
GroupNorm alone (32 groups over 128 channels at 64x64), the op whose speed depends on the layout.

    python benchmarks/forward_speed.py --device cuda --arch job --batch 256 --groupnorm
    python benchmarks/forward_speed.py --device cuda --arch job --batch 256 --compile
        # each compiled first
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sample_speed import CIFAR, JOB, build  # noqa: E402

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def median_ms(fn, device: torch.device, repeats: int) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def groupnorm_ms(device: torch.device, batch: int, repeats: int) -> dict:
    out = {}
    with torch.inference_mode():
        for layout, fmt in LAYOUTS.items():
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(batch, 128, 64, 64,
                                device=device, dtype=dtype).to(memory_format=fmt)
                norm = torch.nn.GroupNorm(32, 128).to(device, dtype)
                out[f"{layout} {str(dtype)[6:]}"] = median_ms(lambda: norm(x), device, repeats)
    return out


def forward_ms(arch: dict, name: str, layout: str, precision: str, args,
               device: torch.device) -> dict:
    """precision: "autocast" (fp32 weights under bf16
    autocast) or "bf16" (bf16 weights and inputs)."""
    torch._dynamo.reset()
    _, ours, theirs = build(arch, device, channels_last=False)
    net = (ours if name == "ddpmkit" else theirs).to(memory_format=LAYOUTS[layout])
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net.to(dtype)
    x = torch.randn(args.batch, 3, arch["size"], arch["size"], device=device, dtype=dtype)
    x = x.to(memory_format=LAYOUTS[layout])
    t = torch.full((args.batch,), 500, device=device)
    model = torch.compile(net) if args.compile else net
    call = (lambda: model(x, t)) if name == "ddpmkit" else (lambda: model(x, t).sample)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=precision == "autocast"):
        t0 = time.perf_counter()
        call()
        first_s = time.perf_counter() - t0  # includes the compilation, with --compile
        ms = median_ms(call, device, args.repeats)
    return {"net": name, "layout": layout, "precision": precision, "forward_ms": ms,
            "first_call_s": round(first_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", choices=["cifar10", "job"], default="cifar10")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile (default mode) each network first")
    ap.add_argument("--groupnorm", action="store_true", help="also time one GroupNorm alone")
    args = ap.parse_args()
    device = torch.device(args.device)
    arch = JOB if args.arch == "job" else CIFAR
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "arch": args.arch,
              "batch": args.batch, "compile": args.compile, "repeats": args.repeats}
    if args.groupnorm:
        result["groupnorm_ms"] = groupnorm_ms(device, args.batch, args.repeats)
    result["forward"] = [forward_ms(arch, name, layout, precision, args, device)
                         for layout in LAYOUTS for precision in ("autocast", "bf16")
                         for name in ("ddpmkit", "diffusers")]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
