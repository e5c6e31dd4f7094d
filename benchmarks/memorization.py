"""Memorization against training-set size, training length and non-leaky augmentation.
Prints JSON; with --plot, an SVG of copy rate against training step (--plot-from: of JSON that
earlier runs printed, without training).

    python benchmarks/memorization.py --work /tmp/mem          # all of it (hours on a CPU)
    python benchmarks/memorization.py --work /tmp/mem --sets digits50 --steps 1000 --every 250

Sets: the bundled digits cut to 50, 200 and all 1,797 images (8x8), and PneumoniaMNIST's 388 normal
chest X-rays (16x16, from ../shared/data). Arms: `plain`, `augmented` (train.augment=[hflip,
translate], train.augment_p=0.5), `light` (the same at p=0.2), `dropout` (model.dropout=0.3, as
improved-diffusion and EDM regularise small sets), `both` (augmented and dropout), `dihedral`
(every operation: flips, 90-degree rotations and shifts, each at p=0.5) and `shift` (integer shifts
alone at p=0.5: digits are not mirror-symmetric, so a mirrored digit is never asked for). Each (set,
arm) trains one unconditional run; at every --every steps its checkpoint samples --num images
(DPM-Solver++ 20 steps, seed 0), which are audited against the run's training images
(metrics/memorization.py: near-copy threshold at the 1% quantile of held-out real images, the digits
outside the subset or PneumoniaMNIST's val normals; all 1,797 digits leave none out, so that set is
calibrated leave-one-out) and scored by a classifier-feature Frechet distance to real images (all
digits; PneumoniaMNIST's val and test normals), one extractor per set for every arm and step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.config import DataConfig, load_config  # noqa: E402
from ddpmkit.data import load_images  # noqa: E402
from ddpmkit.generation import sample  # noqa: E402
from ddpmkit.metrics import features as fx  # noqa: E402
from ddpmkit.metrics.evaluate import cache_dir  # noqa: E402
from ddpmkit.metrics.memorization import audit  # noqa: E402
from ddpmkit.metrics.stats import FeatureStats, frechet_distance  # noqa: E402
from ddpmkit.report import svg_plot  # noqa: E402
from ddpmkit.run import load_run  # noqa: E402
from ddpmkit.training import train  # noqa: E402

PNEUMONIA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist" / \
    "pneumoniamnist_imbalanced.npz"
ARMS = {"plain": {}, "augmented": {"train.augment": ["hflip", "translate"], "train.augment_p": 0.5},
        "light": {"train.augment": ["hflip", "translate"], "train.augment_p": 0.2},
        "dropout": {"model.dropout": 0.3}}
ARMS["both"] = {**ARMS["augmented"], **ARMS["dropout"]}
ARMS["shift"] = {"train.augment": ["translate"], "train.augment_p": 0.5}
ARMS["dihedral"] = {"train.augment": ["hflip", "vflip", "rot90", "translate"],
                    "train.augment_p": 0.5}
# Less capacity than the default UNet: 16 channels, then 8 with one block.
ARMS["narrow"] = {"model.base_channels": 16, "model.norm_groups": 16}
ARMS["tiny"] = {"model.base_channels": 8, "model.norm_groups": 8, "model.num_res_blocks": 1}
QUIET = lambda *_: None  # noqa: E731


def digits(n: int | None):
    """(training images, held-out images or None, FD reference, classifier images and labels),
    8x8; the FD reference is every digit."""
    data = load_images(DataConfig(image_size=8), log=QUIET)
    order = torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))
    chosen = order if n is None else order[:n]
    held = None if n is None else data.images[order[n:]][:500]
    return data.images[chosen], held, data.images, data.images, data.labels


def pneumonia_normals():
    """(388 training normals, 135 val normals, the val and test normals as FD reference, every
    training image and label for the classifier), 16x16."""
    def split(name):
        data = load_images(DataConfig(path=str(PNEUMONIA), image_size=16, split=name), log=QUIET)
        normal = torch.tensor([label == "0" for label in data.labels])
        return data, data.images[normal]

    (train_all, train_normal), (_, val_normal), (_, test_normal) = map(split, ("train", "val",
                                                                              "test"))
    return (train_normal, val_normal, torch.cat([val_normal, test_normal]), train_all.images,
            train_all.labels)


SETS = {"digits50": lambda: digits(50), "digits200": lambda: digits(200),
        "digits1797": lambda: digits(None), "pneumonia388": pneumonia_normals}


def train_run(work: Path, name: str, arm: str, images: torch.Tensor, args, seed: int) -> Path:
    path = work / (f"{name}_{arm}" if seed == 0 else f"{name}_{arm}_seed{seed}")
    np.save(work / f"{name}.npy", images.numpy().transpose(0, 2, 3, 1).squeeze(-1))
    cfg = load_config(None, {
        "data.path": str(work / f"{name}.npy"), "data.image_size": images.shape[-1],
        "train.out_dir": str(path), "train.max_steps": args.steps,
        "train.checkpoint_every": args.every, "train.keep_last": 1000,
        "train.sample_every": args.steps, "train.batch_size": args.batch, "train.seed": seed,
        **ARMS[arm]})
    train(cfg, log=QUIET, progress=False)
    return path


def measure(path: Path, step: int, train_u8, held, extractor, population_stats, num: int) -> dict:
    run = load_run(path, checkpoint=str(step))
    gen = sample(run, num=num, seed=0, sampler="dpmpp-2m", steps=20)
    result = audit(gen, train_u8, held)
    fd = frechet_distance(*_moments(extractor(gen)[0]), *population_stats)
    copied = len(set(result.neighbours.index[result.copies].tolist()))
    return {"step": step, "copy_rate": result.copy_rate, "fd": fd,
            "training_share_copied": copied / len(train_u8),
            "median_distance": float(np.median(result.neighbours.d1)),
            "threshold": result.calibration.threshold, "calibrated_on": result.calibration.on}


def standalone_plot(rows: list[dict]) -> str:
    series = [(f"{r['set']} {r['arm']}", [c["step"] for c in r["curve"]],
               [c["copy_rate"] for c in r["curve"]]) for r in rows]
    return svg_plot(series, "training step", "near-copy rate", width=640, height=300,
                    standalone=True)


def _moments(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stats = FeatureStats.from_features(feats)
    return stats.mu, stats.sigma


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="where runs and subsets go")
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--arms", default="plain,augmented")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--num", type=int, default=256)
    ap.add_argument("--seeds", default="0", help="training seeds (train.seed), one run each")
    ap.add_argument("--plot", type=Path, help="write an SVG of copy rate against step here")
    ap.add_argument("--plot-from", type=Path, nargs="+", metavar="JSON",
                    help="with --plot: plot what earlier runs printed, training nothing")
    args = ap.parse_args()
    if args.plot_from:
        rows = [r for f in args.plot_from for r in json.loads(f.read_text())["results"]]
        args.plot.write_text(standalone_plot(rows))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for name in args.sets.split(","):
        if name == "pneumonia388" and not PNEUMONIA.is_file():
            print(f"skipping {name}: {PNEUMONIA} not found", file=sys.stderr)
            continue
        train_u8, held, reference, judged, labels = SETS[name]()
        extractor = fx.classifier(judged, labels, cache_dir(), log=QUIET)
        population_stats = _moments(extractor(reference)[0])
        for arm, seed in itertools.product(args.arms.split(","), map(int, args.seeds.split(","))):
            t0 = time.time()
            path = train_run(args.work, name, arm, train_u8, args, seed)
            curve = [measure(path, step, train_u8, held, extractor, population_stats, args.num)
                     for step in range(args.every, args.steps + 1, args.every)]
            rows.append({"set": name, "images": len(train_u8), "arm": arm, "seed": seed,
                         "curve": curve, "minutes": round((time.time() - t0) / 60, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                      "steps": args.steps, "batch": args.batch, "num": args.num,
                      "results": rows}, indent=1))
    if args.plot:
        args.plot.write_text(standalone_plot(rows))

if __name__ == "__main__":
    main()
