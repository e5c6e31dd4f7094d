"""The digits judge: a small CNN trained on scikit-learn's real digits, with a fixed recipe, that
scores generated digits. Prints JSON.

    python benchmarks/digits_judge.py SAMPLES/         # a `ddpmkit sample` folder or any PNG folder
    python benchmarks/digits_judge.py --real           # the reference: held-out real digits

Every image (real or generated, any size) is viewed at 16x16 (antialiased bicubic resize, the
same function for both). Reported:
  confident_share   share of images the judge classifies with probability > 0.9
  class_entropy     entropy of the predicted-class histogram / log(10) (1.0 = all ten equally)
  class_shares      share of each digit among the predictions
  frechet_distance  Frechet distance between the judge's 128-d penultimate features of the images
                    and of all 1,797 real digits (not comparable with Inception FID)
The judge trains on 80% of the real digits (seed 0), so `--real` scores the other 20%. Its weights
are cached in ~/.cache/ddpmkit/judge (DDPMKIT_CACHE) keyed by the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.data import resize_center_crop  # noqa: E402
from ddpmkit.metrics.stats import FeatureStats, frechet_distance  # noqa: E402

VIEW = 16
CONFIDENCE = 0.9
RECIPE = {"view": VIEW, "epochs": 40, "batch": 64, "lr": 1e-3, "seed": 0, "train_share": 0.8,
          "shift": 2, "v": 1}
CACHE = Path(os.environ.get("DDPMKIT_CACHE", Path.home() / ".cache" / "ddpmkit")) / "judge"


class JudgeCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (VIEW // 4) ** 2, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        feats = self.body(x)
        return self.head(feats), feats


def view(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W (any size, 1 or 3 channels) -> float N x 1 x 16 x 16 in [0, 1]."""
    if images_u8.shape[1] == 3:
        images_u8 = (images_u8.float()
                     * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        images_u8 = images_u8.round().clamp(0, 255).to(torch.uint8)
    return resize_center_crop(images_u8, VIEW).float() / 255.0


def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    u8 = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8))[:, None]
    return u8, torch.from_numpy(d.target).long()


def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(RECIPE["seed"]))
    cut = int(n * RECIPE["train_share"])
    return perm[:cut], perm[cut:]


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to RECIPE['shift']
    pixels: the judge must not need centred digits."""
    s = RECIPE["shift"]
    padded = F.pad(x, (s, s, s, s))
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * s + 1, (x.shape[0], 2), generator=g)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + VIEW, dx:dx + VIEW]
    return out


def train_judge() -> JudgeCNN:
    key = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    path = CACHE / f"digits_judge_{key}.safetensors"
    torch.manual_seed(RECIPE["seed"])
    model = JudgeCNN()
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    images, labels = real_digits()
    train_idx, _ = split(len(images))
    x, y = view(images[train_idx]), labels[train_idx]
    g = torch.Generator().manual_seed(RECIPE["seed"])
    opt = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    for _ in range(RECIPE["epochs"]):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), RECIPE["batch"]):
            idx = perm[i:i + RECIPE["batch"]]
            loss = F.cross_entropy(model(_shift(x[idx], g))[0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    CACHE.mkdir(exist_ok=True)
    save_file(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def features_and_probs(model: JudgeCNN, images_u8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    logits, feats = [], []
    for i in range(0, len(images_u8), 512):
        lg, ft = model(view(images_u8[i:i + 512]))
        logits.append(lg)
        feats.append(ft)
    return torch.cat(feats).double().numpy(), torch.cat(logits).softmax(-1).double().numpy()


def _stats(feats: np.ndarray):
    s = FeatureStats.from_features(feats)
    return s.mu, s.sigma


def score(images_u8: torch.Tensor) -> dict:
    model = train_judge()
    feats, probs = features_and_probs(model, images_u8)
    real_feats, _ = features_and_probs(model, real_digits()[0])
    pred = probs.argmax(1)
    shares = np.bincount(pred, minlength=10) / len(pred)
    nz = shares[shares > 0]
    return {
        "num_images": int(len(images_u8)),
        "confident_share": float((probs.max(1) > CONFIDENCE).mean()),
        "class_entropy": float(-(nz * np.log(nz)).sum() / np.log(10)),
        "class_shares": [round(float(s), 4) for s in shares],
        "frechet_distance": frechet_distance(*_stats(feats), *_stats(real_feats)),
    }


def read_folder(folder: Path) -> torch.Tensor:
    folder = folder / "individual" if (folder / "individual").is_dir() else folder
    files = sorted(folder.glob("*.png"))
    if not files:
        raise SystemExit(f"no PNG images in {folder}")
    arrays = [np.asarray(Image.open(f).convert("L")) for f in files]
    return torch.from_numpy(np.stack(arrays))[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", nargs="?", type=Path,
                    help="folder of generated digits (a sample output folder)")
    ap.add_argument("--real", action="store_true",
                    help="score the judge's held-out real digits instead")
    args = ap.parse_args()
    if args.real:
        images, labels = real_digits()
        _, test_idx = split(len(images))
        result = score(images[test_idx])
        _, probs = features_and_probs(train_judge(), images[test_idx])
        result["accuracy"] = float((probs.argmax(1) == labels[test_idx].numpy()).mean())
        result["what"] = "held-out real digits"
    elif args.samples:
        result = score(read_folder(args.samples))
        result["what"] = str(args.samples)
    else:
        ap.error("give a samples folder or --real")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
