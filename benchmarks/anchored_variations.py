"""Rare-class images made from the real ones (SDEdit variations) against generated from noise.

    python benchmarks/anchored_variations.py DATA.npz --run RUN --balanced BALANCED --out OUT

A lever for the rare-class issue that `balance` does not have: instead of sampling the rare class
from pure noise, each synthetic image k starts from the class's real training image k mod n,
forward-noised to t = strength * (T - 1) and denoised by the run's class-conditional model
(restoration.img2img_tensor, as `ddpmkit img2img`, but conditioned on the class). Low strengths
stay near their real image (near-copies, which the audit flags); high ones approach free sampling.

1. For each --strengths value, --probe variations: the near-copy rate (the audit's pixel search,
   threshold calibrated leave-one-out on the run's training images) and the share whose nearest
   training image is the one it was made from.
2. The study strength, chosen by a rule fixed before the study: the lowest probed strength whose
   copy rate is at most --max-copy-rate (the most faithful variations a user may hand out).
3. `ddpmkit downstream`'s study (same classifier, recipe, seeds, val-tuned thresholds) with the
   variations at that strength as the primary synthetic arm ("real+selected" in the study's
   tables), beside BALANCED (a `balance` output of the same run) as "real+synthetic", real and
   oversampled.

Prints JSON. BALANCED also supplies the study's leakage check (its record names the run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.data import batch_to_model  # noqa: E402
from ddpmkit.downstream import Pool, TUNED, load_study_data, study  # noqa: E402
from ddpmkit.images import to_uint8  # noqa: E402
from ddpmkit.metrics.memorization import audit  # noqa: E402
from ddpmkit.restoration import img2img_tensor  # noqa: E402
from ddpmkit.run import RunDir, load_run  # noqa: E402
from ddpmkit.samplers import Denoiser  # noqa: E402


@torch.inference_mode()
def variations(run, anchors: torch.Tensor, num: int, strength: float, label: int, *,
               guidance: float, steps: int, seed: int = 0, batch: int = 256) -> torch.Tensor:
    """`num` uint8 images of class `label`; image k is a variation of anchors[k mod n]."""
    made = []
    for start in range(0, num, batch):
        indices = list(range(start, min(num, start + batch)))
        x0 = batch_to_model(anchors[[k % len(anchors) for k in indices]]).to(run.device)
        labels = torch.full((len(indices),), label, dtype=torch.long, device=run.device)
        denoiser = Denoiser(run.net, run.schedule, run.config.diffusion.prediction, True,
                            labels=labels, guidance=guidance)
        x = img2img_tensor(denoiser, x0, strength, seed, indices=indices, sampler="dpmpp-2m",
                           steps=steps)
        made.append(to_uint8(x).cpu())
    return torch.cat(made)


def probe(images: torch.Tensor, train: torch.Tensor, anchor_rows: np.ndarray) -> dict:
    """Copy rate at the leave-one-out threshold, and how many sit nearest their own anchor."""
    found = audit(images, train)
    return {"copy_rate": found.copy_rate, "threshold": found.threshold,
            "median_nearest": float(np.median(found.neighbours.d1)),
            "nearest_is_own_anchor": float((found.neighbours.index == anchor_rows).mean())}


def paired(per_seed: dict, arm: str, metric: str) -> dict:
    """`arm` minus oversampled, seed by seed: mean, std of the differences, and each arm's std."""
    a = np.array([r[metric] for r in per_seed[arm]])
    b = np.array([r[metric] for r in per_seed["oversampled"]])
    return {"mean_gain": float((a - b).mean()), "std_of_gain": float((a - b).std(ddof=1)),
            "largest_std": max(float(np.std([r[metric] for r in runs], ddof=1))
                               for runs in per_seed.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", help="an .npz with train, val and test splits")
    ap.add_argument("--run", required=True, help="the class-conditional generator")
    ap.add_argument("--balanced", required=True, help="a balance output of --run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--strengths", default="0.2,0.35,0.5,0.7")
    ap.add_argument("--max-copy-rate", type=float, default=0.01)
    ap.add_argument("--probe", type=int, default=512)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--probe-only", action="store_true")
    args = ap.parse_args()

    names, real, synth, test, cal, leakage = load_study_data(args.data, args.balanced,
                                                             calibration_split="val")
    run = load_run(args.run)
    train = RunDir(run.path).training_images(log=lambda *_: None)
    counts = np.bincount(real.labels, minlength=len(names))
    rare = int(counts.argmin())
    anchors = real.images[real.labels == rare]
    # where each anchor sits in the run's training set, to see if a variation stays nearest it
    where = {bytes(img.numpy()): i for i, img in enumerate(train)}
    anchor_rows = np.array([where.get(bytes(img.numpy()), -1) for img in anchors])
    label = run.config.data.class_names.index(names[rare])
    common = {"guidance": args.guidance, "steps": args.steps}
    result = {"rare": names[rare], "anchors": len(anchors), "probe": {}}
    for s in map(float, args.strengths.split(",")):
        t0 = time.time()
        images = variations(run, anchors, args.probe, s, label, **common)
        rows = anchor_rows[np.arange(args.probe) % len(anchors)]
        result["probe"][s] = probe(images, train, rows) | {"seconds": time.time() - t0}
        print(f"strength {s}: {result['probe'][s]}", file=sys.stderr)
    fit = [s for s, p in result["probe"].items() if p["copy_rate"] <= args.max_copy_rate]
    if args.probe_only or not fit:
        result["study"] = None if fit else "no strength within --max-copy-rate"
        print(json.dumps(result, indent=1))
        return
    strength = result["strength"] = min(fit)
    need = int(counts.max() - counts[rare])
    varied = variations(run, anchors, need, strength, label, **common)
    result["copies"] = probe(varied, train, anchor_rows[np.arange(need) % len(anchors)])
    pool = Pool(varied, np.full(need, rare), source=f"variations at strength {strength}")
    summary = study(real, synth, test, names, args.out, leakage=leakage, calibration=cal,
                    log=lambda m: print(m, file=sys.stderr), seeds=args.seeds, selected=pool)
    result["table"], result["class_fidelity"] = summary["table"], summary["class_fidelity"]
    result["against_oversampled"] = {
        arm: {m: paired(summary["per_seed"], arm, m) for m in ("balanced_accuracy", TUNED)}
        for arm in ("real+selected", "real+synthetic")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
