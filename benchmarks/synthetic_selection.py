"""Choose a synthetic set (guidance, amount) on the validation split, before the test split is used.

    ddpmkit balance run --out bal_g1 sample.guidance=1
    ddpmkit balance run --out bal_g2 sample.guidance=2
    python benchmarks/synthetic_selection.py --real data.npz bal_g1 bal_g2 --synthetic-share none,.5
        # scores on data.npz's val split, each set at each share
    ddpmkit downstream --real data.npz --synthetic bal_<chosen> --out study/
        # then, once, on the test split

Every arm uses `ddpmkit downstream`'s classifier and recipe (same seeds, steps, augmentation): the
two baselines (real, oversampled) once, then real + each synthetic set. Validation images that the
generator saw (PneumoniaMNIST's val split repeats 8 of its train images) are dropped, and counted.
Prints JSON: balanced accuracy, AUROC and per-class recall (mean and std over seeds) per arm, and
the arm with the best mean of --choose-by (AUROC, which no threshold moves, stands in for the
study's tuned-threshold figure). Choosing on the test split instead would make the study's
verdict optimistic.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.downstream import (Pool, combine, load_study_data, predict, scores,  # noqa: E402
                                train_classifier)
from ddpmkit.errors import UserError, escape_controls  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("synthetic", nargs="+", help="balance output folders to compare")
    ap.add_argument("--real", required=True)
    ap.add_argument("--real-split", default="train")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--synthetic-share", default="none",
                    help="comma-separated shares, as `ddpmkit downstream --synthetic-share`; "
                         "none: every image equally often")
    ap.add_argument("--choose-by", default="balanced_accuracy",
                    choices=["balanced_accuracy", "auroc"])
    ap.add_argument("--no-baselines", action="store_true",
                    help="skip the real and oversampled arms (already measured)")
    args = ap.parse_args()

    shares = [None if s == "none" else float(s) for s in args.synthetic_share.split(",")]

    def evaluate(pool: Pool, arm: str, val: Pool, names: list[str], share=None) -> dict:
        t0, rows = time.time(), []
        for seed in range(args.seeds):
            net = train_classifier(pool, len(names), arm, seed, args.steps, batch=64, lr=2e-3,
                                   synthetic_share=share)
            rows.append(scores(predict(net, val.images), val.labels, names))
        out = {k: [round(float(np.mean([r[k] for r in rows])), 4),
                   round(float(np.std([r[k] for r in rows], ddof=1)), 4)]
               for k in rows[0] if k in ("balanced_accuracy", "auroc") or k.startswith("recall")}
        print(f"{arm}: {out} ({time.time() - t0:.0f} s)", file=sys.stderr)
        return out

    results, best = {}, None
    for i, folder in enumerate(args.synthetic):
        names, real, synth, val, _, leakage = load_study_data(args.real, folder, None,
                                                              args.real_split, args.val_split,
                                                              drop_seen=True)
        if i == 0 and not args.no_baselines:
            results["real"] = evaluate(real, "real", val, names)
            results["oversampled"] = evaluate(real, "oversampled", val, names)
        pool, per_class = combine(real, synth), np.bincount(synth.labels, minlength=len(names))
        for share in shares:
            arm = f"real+{folder}" + ("" if share is None else f"@share{share:g}")
            results[arm] = {**evaluate(pool, "real+synthetic", val, names, share),
                            "synthetic_per_class": per_class.tolist()}
            if best is None or results[arm][args.choose_by][0] > results[best][args.choose_by][0]:
                best = arm
    print(json.dumps({"split": args.val_split, "seeds": args.seeds, "steps": args.steps,
                      "choose_by": args.choose_by, "arms": results,
                      "best_synthetic": best, "leakage": leakage}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # the README points users here: one line, as ddpmkit's own commands
        sys.exit(f"synthetic_selection: error: {escape_controls(exc)}")
