"""Quality per step: each sampler at several step counts on one trained run, judged by the digits
judge (benchmarks/digits_judge.py). Prints JSON, one row per (sampler, steps, spacing).

    python benchmarks/sampler_quality.py runs/default            # 1,000 images per row
    python benchmarks/sampler_quality.py runs/default --num 500 --quick
    python benchmarks/sampler_quality.py runs/default --row heun:10:karras --row dpmpp-2m:20:uniform

Every row uses the same seed, so the rows differ only by the sampler.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_judge import score  # noqa: E402

from ddpmkit import load_run, sample  # noqa: E402
from ddpmkit.samplers import nfe  # noqa: E402

ROWS = [  # (sampler, steps, spacing)
    ("ddpm", 1000, "uniform"),
    ("ddim", 10, "uniform"), ("ddim", 20, "uniform"), ("ddim", 50, "uniform"),
    ("dpmpp-2m", 10, "uniform"), ("dpmpp-2m", 20, "uniform"), ("dpmpp-2m", 10, "karras"),
    ("dpmpp-2m", 20, "karras"), ("dpmpp-2m-sde", 20, "karras"), ("dpmpp-2m-sde", 50, "karras"),
    ("euler", 20, "karras"), ("heun", 10, "karras"), ("ddpm", 50, "uniform"),
]
QUICK = [r for r in ROWS if r[1] <= 20 or r[0] == "ddpm" and r[1] == 1000]


def _row(text: str) -> tuple[str, int, str]:
    sampler, steps, spacing = text.split(":")
    return sampler, int(steps), spacing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="only rows of at most 20 steps, plus DDPM-1000")
    ap.add_argument("--row", action="append", type=_row, metavar="SAMPLER:STEPS:SPACING",
                    help="only these rows (repeatable), e.g. to rerun one after a sampler changed")
    args = ap.parse_args()
    run = load_run(args.run)
    results = []
    for sampler, steps, spacing in args.row or (QUICK if args.quick else ROWS):
        t0 = time.perf_counter()
        images = sample(run, num=args.num, seed=args.seed, sampler=sampler, steps=steps,
                        spacing=spacing)
        seconds = time.perf_counter() - t0
        row = {"sampler": sampler, "steps": steps, "spacing": spacing, "nfe": nfe(sampler, steps),
               "seconds": round(seconds, 1), **score(images)}
        row.pop("class_shares")
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"run": str(args.run), "checkpoint_step": run.step, "num": args.num,
                      "threads": torch.get_num_threads(),
                      "date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))


if __name__ == "__main__":
    main()
