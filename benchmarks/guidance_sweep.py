"""Classifier-free guidance sweep on a class-conditional digits run, judged by the digits judge.
Prints JSON, one row per guidance scale.

    ddpmkit train model.class_conditional=true --out runs/digits-cond
        # the default recipe, with labels
    python benchmarks/guidance_sweep.py runs/digits-cond                 # 1,000 images per scale

For each scale: --num images, classes in turn (image k asks for digit k mod 10), DPM-Solver++ 20
steps, seed 0, so rows differ only by the scale. Reported: the share of images the judge reads as
the digit asked for (class accuracy), its confident share and class entropy, and the judge-feature
Frechet distance to the real digits (diversity and fidelity together).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_judge import features_and_probs, score, train_judge  # noqa: E402

from ddpmkit import load_run, sample  # noqa: E402

SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--scales", default=",".join(str(s) for s in SCALES))
    args = ap.parse_args()
    run = load_run(args.run)
    judge = train_judge()
    asked = np.array([int(run.config.data.class_names[k % 10]) for k in range(args.num)])
    rows = []
    for scale in (float(s) for s in args.scales.split(",")):
        images = sample(run, num=args.num, seed=0, sampler="dpmpp-2m", steps=20, guidance=scale)
        _, probs = features_and_probs(judge, images)
        row = {"guidance": scale, "class_accuracy": float((probs.argmax(1) == asked).mean()),
               **score(images)}
        row.pop("class_shares")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"run": str(args.run), "checkpoint_step": run.step, "num": args.num,
                      "sampler": "dpmpp-2m, 20 steps",
                      "date": time.strftime("%Y-%m-%d"), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
