"""Denoising on held-out real images: ddpmkit (posterior mean, one network call) against
scikit-image's non-local means and total variation, PSNR and SSIM at sigma 0.1, 0.2, 0.4
([0, 1] scale). Prints JSON.

    python benchmarks/restoration.py --quick                       # small models, minutes on a CPU
    python benchmarks/restoration.py --minutes 60 --eval-num 500   # a real comparison (GPU advised)
    python benchmarks/restoration.py --run mnist=runs/mnist28      # reuse a trained run

Data: the MNIST test set (10,000 digits, ../shared/data/mnist-test) and, when installed, the
Fashion-MNIST test set (`apt-get install dataset-fashion-mnist`). Each is permuted with a fixed seed
and split three ways, disjoint: the ddpmkit model trains on the first part, the baselines'
parameters are tuned (grid search, best mean PSNR per sigma) on the second, and every method is
scored on the last `--eval-num` images. The model is trained at 28x28 with channel_mult [1, 2, 2]
(28 -> 14 -> 7; the config check needs image_size divisible by 2^(levels-1)), no padding.

Noise: y = x + sigma * n on [0, 1], not clipped or quantised, given identically to every method, and
every method is told the true sigma (NLM's `sigma`, the model's matched timestep). Outputs are
clipped to [0, 1] before scoring.
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

from ddpmkit.config import load_config
from ddpmkit.data import read_idx
from ddpmkit.restoration import denoise_tensor
from ddpmkit.run import load_run
from ddpmkit.samplers import Denoiser
from ddpmkit.training import train

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {
    "mnist": ROOT.parent / "shared" / "data" / "mnist-test" / "t10k-images-idx3-ubyte.gz",
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"),
}
SIGMAS = (0.1, 0.2, 0.4)


def load_split(path: Path, tune_num: int, eval_num: int, seed: int = 0):
    images = read_idx(path)  # N x 28 x 28 uint8
    order = np.random.default_rng(seed).permutation(len(images))
    images = images[order]
    train_part = images[: len(images) - tune_num - eval_num]
    tune = images[len(images) - tune_num - eval_num: len(images) - eval_num]
    held = images[len(images) - eval_num:]
    return train_part, tune.astype(np.float64) / 255, held.astype(np.float64) / 255


def train_model(name: str, train_images: np.ndarray, workdir: Path, quick: bool,
                minutes: float) -> Path:
    npy = workdir / f"{name}_train.npy"
    np.save(npy, train_images)
    model = {"model.base_channels": 32, "model.channel_mult": [1, 2, 2], "model.num_res_blocks": 1,
             "model.norm_groups": 8} if quick else \
            {"model.base_channels": 64, "model.channel_mult": [1, 2, 2], "model.num_res_blocks": 2,
             "model.attention_resolutions": [7]}
    cfg = load_config(None, {
        "data.path": str(npy), "data.image_size": 28, **model,
        "diffusion.num_timesteps": 1000, "diffusion.schedule": "linear",
        "train.out_dir": str(workdir / f"run_{name}"), "train.batch_size": 64 if quick else 128,
        "train.lr": 1e-3 if quick else 2e-4, "train.warmup_steps": 100, "train.max_steps": 10**7,
        "train.max_minutes": minutes, "train.ema_decay": 0.995 if quick else 0.999,
        "train.log_every": 50, "train.sample_every": 10**7, "train.checkpoint_every": 10**7,
        "train.grid_images": 4, "train.grid_steps": 10,
    })
    run = train(cfg, fresh=True, log=lambda *a: print(*a, file=sys.stderr), progress=False)
    return run.path


def psnr_ssim(clean: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p = [peak_signal_noise_ratio(c, o, data_range=1.0) for c, o in zip(clean, out)]
    s = [structural_similarity(c, o, data_range=1.0) for c, o in zip(clean, out)]
    return float(np.mean(p)), float(np.mean(s))


def nlm(noisy, sigma, h, patch_size, patch_distance):
    from skimage.restoration import denoise_nl_means

    return np.stack([denoise_nl_means(y, h=h * sigma, sigma=sigma, patch_size=patch_size,
                                      patch_distance=patch_distance, fast_mode=True)
                     for y in noisy]).clip(0, 1)


def tv(noisy, sigma, weight):
    from skimage.restoration import denoise_tv_chambolle

    return np.stack([denoise_tv_chambolle(y, weight=weight) for y in noisy]).clip(0, 1)


NLM_GRID = [dict(h=h, patch_size=p, patch_distance=d)
            for h in (0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.2, 1.6)
            for p in (3, 5, 7) for d in (3, 6, 9)]
TV_GRID = [dict(weight=w) for w in (0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7)]


def tune(fn, grid, clean, noisy, sigma) -> dict:
    scores = [(psnr_ssim(clean, fn(noisy, sigma, **p))[0], i) for i, p in enumerate(grid)]
    return grid[max(scores)[1]]


def ddpm_denoise(run, noisy: np.ndarray, sigma: float, batch: int = 250) -> np.ndarray:
    den = Denoiser(run.net, run.schedule, run.config.diffusion.prediction, clip_x0=True)
    y = torch.from_numpy(noisy).float()[:, None] * 2 - 1  # model scale
    outs = [denoise_tensor(den, y[i:i + batch], sigma) for i in range(0, len(y), batch)]
    return ((torch.cat(outs)[:, 0].double() + 1) / 2).clamp(0, 1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small model, 3 training minutes a set, 200 eval / 100 tune")
    ap.add_argument("--minutes", type=float, default=None, help="training minutes per data set")
    ap.add_argument("--eval-num", type=int, default=None)
    ap.add_argument("--tune-num", type=int, default=None)
    ap.add_argument("--run", action="append", default=[], metavar="SET=RUN",
                    help="reuse a trained run for a set")
    ap.add_argument("--sets", default="mnist,fashion-mnist")
    ap.add_argument("--workdir", default="/tmp/ddpmkit-restoration-bench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    minutes = args.minutes or (3.0 if args.quick else 60.0)
    eval_num = args.eval_num or (200 if args.quick else 500)
    tune_num = args.tune_num or (100 if args.quick else 500)
    reuse = dict(r.split("=", 1) for r in args.run)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    result = {"quick": args.quick, "eval_num": eval_num, "tune_num": tune_num, "sigmas": SIGMAS,
              "sets": {}, "notes": []}
    for name in args.sets.split(","):
        path = DATASETS[name]
        if not path.is_file():
            result["notes"].append(f"{name}: skipped, {path} not found"
                                   + (" (apt-get install dataset-fashion-mnist)"
                                      if "fashion" in name else ""))
            continue
        train_images, tune_set, eval_set = load_split(path, tune_num, eval_num, args.seed)
        t0 = time.time()
        run_path = (Path(reuse[name]) if name in reuse
                    else train_model(name, train_images, workdir, args.quick, minutes))
        run = load_run(run_path)
        entry = {"train_images": len(train_images), "run": str(run_path), "model_steps": run.step,
                 "train_seconds": round(time.time() - t0, 1) if name not in reuse else None,
                 "by_sigma": {}}
        rng = np.random.default_rng(args.seed + 1)
        for sigma in SIGMAS:
            noisy_tune = tune_set + sigma * rng.standard_normal(tune_set.shape)
            noisy_eval = eval_set + sigma * rng.standard_normal(eval_set.shape)
            p_nlm = tune(nlm, NLM_GRID, tune_set, noisy_tune, sigma)
            p_tv = tune(tv, TV_GRID, tune_set, noisy_tune, sigma)
            rows = {}
            for method, fn in [("noisy", lambda y: y.clip(0, 1)),
                               ("ddpmkit_mmse", lambda y: ddpm_denoise(run, y, sigma)),
                               ("nl_means", lambda y: nlm(y, sigma, **p_nlm)),
                               ("tv_chambolle", lambda y: tv(y, sigma, **p_tv))]:
                t1 = time.time()
                out = fn(noisy_eval)
                p, s = psnr_ssim(eval_set, out)
                rows[method] = {"psnr": round(p, 3), "ssim": round(s, 4),
                                "seconds": round(time.time() - t1, 2)}
            rows["nl_means"]["params"] = p_nlm
            rows["tv_chambolle"]["params"] = p_tv
            entry["by_sigma"][str(sigma)] = rows
            print(f"{name} sigma={sigma}: "
                  + ", ".join(f"{k} {v['psnr']:.2f} dB" for k, v in rows.items()),
                  file=sys.stderr)
        result["sets"][name] = entry
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
