"""Is a downstream gain more than a better decision threshold? (binary studies)

    python benchmarks/threshold_check.py --real data.npz --synthetic balanced/ --synthetic-share 0.25 --seeds 5

Trains `ddpmkit downstream`'s three arms with its recipe and seeds (the same classifiers as the study),
then scores each on the test split twice: at the default threshold (argmax, as the study does) and at
the threshold that maximises balanced accuracy on the val split (val images the generator saw are
dropped). If the synthetic arm's gain survives the tuned threshold, it is more than a shifted
operating point. Prints JSON: balanced accuracy per arm and seed, both ways, with means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.downstream import ARMS, combine, load_study_data, predict, train_classifier  # noqa: E402


def balanced_accuracy(p_positive: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    return float(balanced_accuracy_score(labels, (p_positive >= threshold).astype(int)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", required=True)
    ap.add_argument("--synthetic", required=True)
    ap.add_argument("--synthetic-share", type=float, default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1500)
    args = ap.parse_args()
    names, real, synth, test, leakage = load_study_data(args.real, args.synthetic)
    *_, val, _ = load_study_data(args.real, args.synthetic, test_split="val", drop_seen=True)
    if len(names) != 2:
        sys.exit("threshold_check.py: binary studies only")
    pools = {"real": real, "real+synthetic": combine(real, synth), "oversampled": real}
    grid = np.linspace(0.01, 0.99, 99)
    rows: dict[str, dict[str, list[float]]] = {arm: {"default": [], "val_tuned": [], "threshold": []} for arm in ARMS}
    for seed in range(args.seeds):
        for arm in ARMS:
            net = train_classifier(pools[arm], 2, arm, seed, args.steps, batch=64, lr=2e-3,
                                   synthetic_share=args.synthetic_share)
            p_val, p_test = predict(net, val.images)[:, 1], predict(net, test.images)[:, 1]
            best = float(grid[np.argmax([balanced_accuracy(p_val, val.labels, t) for t in grid])])
            rows[arm]["default"].append(balanced_accuracy(p_test, test.labels, 0.5))
            rows[arm]["val_tuned"].append(balanced_accuracy(p_test, test.labels, best))
            rows[arm]["threshold"].append(best)
            print(f"seed {seed} {arm}: default {rows[arm]['default'][-1]:.4f}, val-tuned threshold {best:.2f} -> "
                  f"{rows[arm]['val_tuned'][-1]:.4f}", file=sys.stderr)
    summary = {arm: {k: round(float(np.mean(v)), 4) for k, v in r.items()} | {"per_seed": r} for arm, r in rows.items()}
    print(json.dumps({"seeds": args.seeds, "steps": args.steps, "synthetic_share": args.synthetic_share,
                      "leakage": leakage, "arms": summary}, indent=1))


if __name__ == "__main__":
    main()
