"""A rare-class study end to end: the generator, each lever on its own, and the downstream verdict.
Prints JSON.

    python benchmarks/imbalanced_sets.py fashion --out /tmp/sets/fashion.npz
    python benchmarks/rare_class.py /tmp/sets/fashion.npz --work /tmp/rare/fashion
    python benchmarks/rare_class.py ../shared/data/pneumoniamnist/pneumoniamnist_imbalanced.npz \\
        --work /tmp/rare/pneumonia

The .npz has train and test splits (and val, for thresholds) and two or more classes; the rare class
is the one with the fewest training images. Steps:
1. one class-conditional generator per --class-balance power (16x16, the small preset);
2. levers: for each generator and guidance scale, the class fidelity of --probe rare-class
   samples (the share the selector, a classifier of the real training images, assigns to the rare
   class) and the share passing its threshold (set on the val split where there is one), beside
   the real images' own;
3. `balance --select --class-guidance auto` with the generator of the largest power;
4. `downstream` on the test split (`--calibration-split val` where there is a val split):
   real, real+synthetic (unselected), real+selected and oversampled, --seeds seeds each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.cli import main as ddpmkit  # noqa: E402
from ddpmkit.config import DataConfig  # noqa: E402
from ddpmkit.data import load_images  # noqa: E402
from ddpmkit.errors import UserError  # noqa: E402
from ddpmkit.generation import sample  # noqa: E402
from ddpmkit.run import RunDir, load_run  # noqa: E402
from ddpmkit.selection import SelectOptions, build_selector  # noqa: E402

QUIET = lambda *_: None  # noqa: E731
SCALES = (1.0, 2.0, 3.0)


def run_cli(argv: list[str]) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
        code = ddpmkit(argv)
    if code:
        raise SystemExit(f"ddpmkit {' '.join(argv[:2])} failed ({code})")


def train_generator(data: Path, out: Path, power: float, args) -> Path:
    # rerunning the study resumes a killed generator and reuses a finished one
    run_cli(["train", f"--data={data}", "--out", str(out), "--quiet",
             "model.class_conditional=true", "data.image_size=16",
             f"train.class_balance={power}", f"train.max_steps={args.steps}",
             f"train.batch_size={args.batch}", f"train.checkpoint_every={args.steps}",
             f"train.sample_every={args.steps}"])
    return out


def rarest_class(data_path: Path) -> str:
    """The class with the fewest training images."""
    counts = Counter(load_images(DataConfig(path=str(data_path)), log=QUIET).labels)
    return min(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


def has_val_split(data_path: Path) -> bool:
    try:
        load_images(DataConfig(path=str(data_path), split="val"), log=QUIET)
    except UserError:
        return False
    return True


def levers(run_path: Path, rare: str, probe: int) -> dict:
    """Class fidelity and selector pass rate of rare-class samples per guidance scale, and the real
    val images' own."""
    cfg = RunDir(run_path).config()
    data = load_images(cfg.data, log=QUIET)
    selector = build_selector(cfg.data, data.images, data.labels, cfg.data.class_names,
                              SelectOptions(), log=QUIET)
    run = load_run(run_path)
    rows = {}
    for scale in SCALES:
        images = sample(run, num=probe, seed=1, class_label=rare, guidance=scale)
        fidelity, passing = selector.fidelity(images, rare)
        rows[scale] = {"fidelity": fidelity, "passes_threshold": passing}
    return {"by_guidance": rows, "real_val_fidelity": selector.real_fidelity[rare],
            "real_val_passes": selector.real_pass[rare],
            "threshold": selector.thresholds[rare], "calibrated_on": selector.calibrated_on}


def verdict_figures(summary: dict, rare: str) -> dict:
    """The judged numbers: each synthetic arm against oversampling, at default and tuned
    thresholds, with the largest seed-to-seed std."""
    table, out = summary["table"], {}
    for metric in ("balanced_accuracy", "balanced_accuracy@tuned", f"recall[{rare}]",
                   f"recall@tuned[{rare}]"):
        if metric not in table["real"]:
            continue
        base = table["oversampled"][metric][0]
        out[metric] = {"largest_std": max(row[metric][1] for row in table.values()),
                       "arms": {arm: {"mean": row[metric][0], "std": row[metric][1],
                                      "gain_over_oversampled": row[metric][0] - base}
                                for arm, row in table.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path, help="an .npz with train and test splits (val optional)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--class-balance", default="0,1", help="one generator per power")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--probe", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--synthetic-share", type=float, default=None,
                    help="as `ddpmkit downstream --synthetic-share` (choose it on the val split: "
                         "benchmarks/synthetic_selection.py)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    rare = rarest_class(args.data)
    # without a val split the study reports the default decision only
    calibration = ["--calibration-split", "val"] if has_val_split(args.data) else []
    result, t0 = {"data": str(args.data), "rare_class": rare, "steps": args.steps,
                  "batch": args.batch, "synthetic_share": args.synthetic_share}, time.time()
    runs = {}
    for power in [float(p) for p in args.class_balance.split(",")]:
        runs[power] = train_generator(args.data, args.work / f"gen_balance{power:g}", power, args)
        result[f"levers_balance{power:g}"] = levers(runs[power], rare, args.probe)
        print(json.dumps(result[f"levers_balance{power:g}"]), file=sys.stderr)
    balanced = args.work / "balanced"
    run_cli(["balance", str(runs[max(runs)]), "--out", str(balanced), "--quiet", "--select",
             "--class-guidance", "auto", "sample.steps=20"])
    result["selection"] = json.loads((balanced / "selection.json").read_text())
    run_cli(["downstream", "--real", str(args.data), "--synthetic", str(balanced), "--out",
             str(args.work / "study"), "--fresh", "--seeds", str(args.seeds), "--steps",
             str(args.classifier_steps), *calibration,
             *([] if args.synthetic_share is None else
               ["--synthetic-share", str(args.synthetic_share)])])
    summary = json.loads((args.work / "study" / "results.json").read_text())
    result.update({"verdict": summary["verdict"], "figures": verdict_figures(summary, rare),
                   "class_fidelity": summary["class_fidelity"],
                   "synthetic_copies": summary["synthetic_copies"],
                   "minutes": round((time.time() - t0) / 60, 1)})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
