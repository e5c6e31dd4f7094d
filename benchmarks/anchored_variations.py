"""Rare-class images varied from the real ones (`balance --from-real`): near-copies, then the study.

    python benchmarks/anchored_variations.py DATA.npz --run RUN --work WORK

RUN is a class-conditional generator trained on DATA's train split (rare_class.py trains one).
1. For each --strengths value, --probe variations of the rare class's real images (sample_batch
   with Anchors, as `balance --from-real` makes them): the near-copy rate (the audit's pixel search,
   threshold calibrated leave-one-out on the run's training images) and the share whose nearest
   training image is the one it was made from.
2. The study strength, by a rule fixed before the study: the lowest probed strength whose copy
   rate is at most --max-copy-rate (the most faithful variations a user may hand out).
3. `ddpmkit balance RUN --from-real STRENGTH`, then `ddpmkit downstream` on DATA's test split with
   thresholds tuned on its val split: real, real+synthetic (the variations) and oversampled,
   --seeds seeds each.

Prints JSON: the probe, the strength, the study's table and its paired tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.cli import main as ddpmkit  # noqa: E402
from ddpmkit.generation import Anchors, SamplingSpec, sample_batch  # noqa: E402
from ddpmkit.images import to_uint8  # noqa: E402
from ddpmkit.metrics.memorization import audit  # noqa: E402
from ddpmkit.run import RunDir, load_run  # noqa: E402


def run_cli(argv: list[str]) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
        code = ddpmkit(argv)
    if code:
        raise SystemExit(f"ddpmkit {' '.join(argv[:2])} failed ({code})")


@torch.inference_mode()
def probe(run, rows: np.ndarray, train: torch.Tensor, rare: str, strength: float,
          num: int) -> dict:
    """`num` variations of the rare class's training images `rows`: the copy rate at the
    leave-one-out threshold, and how many sit nearest the image they were made from."""
    spec = SamplingSpec(steps=20, class_label=rare).checked(run)
    anchors = Anchors(train[rows], strength)
    images = to_uint8(sample_batch(run, range(num), 0, spec, anchors=anchors))
    found = audit(images, train)
    return {"copy_rate": found.copy_rate, "threshold": found.calibration.threshold,
            "median_nearest": float(np.median(found.neighbours.d1)),
            "nearest_is_own_anchor": float((found.neighbours.index
                                            == rows[np.arange(num) % len(rows)]).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="an .npz with train, val and test splits")
    ap.add_argument("--run", required=True, help="the class-conditional generator")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--strengths", default="0.2,0.35,0.5,0.7")
    ap.add_argument("--max-copy-rate", type=float, default=0.01)
    ap.add_argument("--probe", type=int, default=512)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--probe-only", action="store_true")
    args = ap.parse_args()

    run = load_run(args.run)
    trained = RunDir(run.path).training_set(log=lambda *_: None)
    rare = min(Counter(trained.labels).items(), key=lambda item: item[1])[0]
    rows = np.flatnonzero(np.array(trained.labels) == rare)
    result = {"rare": rare, "real_images": len(rows), "probe": {}}
    for s in map(float, args.strengths.split(",")):
        result["probe"][s] = probe(run, rows, trained.images, rare, s, args.probe)
        print(f"strength {s}: {result['probe'][s]}", file=sys.stderr)
    fit = [s for s, p in result["probe"].items() if p["copy_rate"] <= args.max_copy_rate]
    if args.probe_only or not fit:
        result["study"] = None if fit else "no strength within --max-copy-rate"
        print(json.dumps(result, indent=1))
        return
    strength = result["strength"] = min(fit)
    balanced, study = args.work / f"from_real_{strength:g}", args.work / "study"
    run_cli(["balance", args.run, "--out", str(balanced), "--from-real", str(strength),
             "--quiet", "sample.steps=20"])
    run_cli(["downstream", "--real", args.data, "--synthetic", str(balanced), "--out",
             str(study), "--fresh", "--seeds", str(args.seeds), "--calibration-split", "val"])
    summary = json.loads((study / "results.json").read_text())
    result |= {k: summary[k] for k in ("verdict", "table", "paired_tests", "paired_tests_tuned",
                                       "class_fidelity", "synthetic_copies")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
