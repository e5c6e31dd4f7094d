"""What tiling costs: denoising images larger than the model, tile by tile, against denoising each
model-sized piece on its own. Prints JSON.

    python benchmarks/restoration_tiling.py --run runs/quality     # a run trained on the 8x8 digits

Each test image is a 2 x 2 mosaic of four 8x8 digits (16x16). The same noise y = x + sigma * n
([0, 1] scale, quantised to uint8 as a user's PNG would be) is denoised two ways with the posterior
mean (one network call per tile):
  - tiled: the 16x16 mosaic through `ddpmkit.restoration.denoise` (3 x 3 overlapping 8x8 tiles);
  - alone: each 8x8 digit of the mosaic through the same function at the model's own size.
The tiles straddling two digits show the network a view it never trained on, so the gap between the
two is the price of tiling; PSNR is also reported on the seam band (the 4 central rows and columns).
The digits are the run's training images: both ways score on the same images, so the gap is fair,
but the absolute PSNR is not a held-out figure (benchmarks/restoration.py has those).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpmkit.restoration import denoise  # noqa: E402
from ddpmkit.run import load_run  # noqa: E402


def psnr(clean: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((clean - out) ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True,
                    help="a run trained on the 8x8 digits (the default config)")
    ap.add_argument("--mosaics", type=int, default=200)
    ap.add_argument("--sigmas", default="0.05,0.1,0.2")
    args = ap.parse_args()
    torch.manual_seed(0)
    run = load_run(args.run)
    if run.image_size != 8 or run.channels != 1:
        raise SystemExit(f"{args.run}: expected a model of 8x8 grayscale digits, got "
                         f"{run.channels}x{run.image_size}")
    from sklearn.datasets import load_digits

    digits = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(digits))[: 4 * args.mosaics].reshape(
        args.mosaics, 2, 2)
    mosaics = np.block([[digits[order[:, 0, 0]], digits[order[:, 0, 1]]],
                        [digits[order[:, 1, 0]], digits[order[:, 1, 1]]]])  # N x 16 x 16
    clean = mosaics.astype(np.float64) / 255
    seam = np.zeros((16, 16), bool)
    seam[6:10, :] = seam[:, 6:10] = True
    rows = {}
    for sigma in (float(s) for s in args.sigmas.split(",")):
        rng = np.random.default_rng(1)
        noisy = np.clip(np.round((clean + sigma * rng.standard_normal(clean.shape)) * 255),
                        0, 255).astype(np.uint8)
        noisy_t = torch.from_numpy(noisy)[:, None]
        tiled = denoise(run, noisy_t, sigma)[:, 0].numpy() / 255
        pieces = noisy_t.unfold(2, 8, 8).unfold(3, 8, 8)  # N x 1 x 2 x 2 x 8 x 8
        alone = denoise(run, pieces.permute(0, 2, 3, 1, 4, 5).reshape(-1, 1, 8, 8).contiguous(),
                        sigma)
        alone = (alone.reshape(-1, 2, 2, 8, 8).permute(0, 1, 3, 2, 4).reshape(-1, 16, 16).numpy()
                 / 255)
        rows[str(sigma)] = {
            "psnr_noisy": round(psnr(clean, noisy / 255), 2),
            "psnr_tiled": round(psnr(clean, tiled), 2), "psnr_alone": round(psnr(clean, alone), 2),
            "seam_psnr_tiled": round(psnr(clean[:, seam], tiled[:, seam]), 2),
            "seam_psnr_alone": round(psnr(clean[:, seam], alone[:, seam]), 2)}
    print(json.dumps({"benchmark": "restoration_tiling", "run": args.run, "step": run.step,
                      "mosaics": args.mosaics,
                      "machine": platform.processor() or platform.machine(),
                      "torch": torch.__version__, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
