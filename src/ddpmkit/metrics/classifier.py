"""The one small classifier of ddpmkit, trained on labelled real images: the `classifier` features
of `eval` and of evaluation during training, every classifier of the `downstream` study,
`balance --select`'s selector and the classifier view of `audit`.

One network (a small ResNet), one training loop (AdamW with a one-cycle learning rate, batches
drawn with replacement by per-image weights), one augmentation (random shifts, optionally flips)
and one class order (data.class_order: 2 before 10). Images enter as uint8 and are scaled to
[-1, 1] as the diffusion model's are.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import atomic
from ..data import batch_to_model, image_digests
from ..runtime import mix_seed


class SmallResNet(nn.Module):
    """Two stages of two residual blocks (32 and 64 channels), global pooling, a linear head. Any
    image size: the pooling makes the features 64 numbers."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.ModuleList([_Block(32, 32, 1), _Block(32, 32, 1),
                                     _Block(32, 64, 2), _Block(64, 64, 1)])
        self.head = nn.Linear(64, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(h + (x if self.skip is None else self.skip(x)))


def augment(x: torch.Tensor, g: torch.Generator, flips: bool = True) -> torch.Tensor:
    """Random shifts of up to 2 pixels (reflect padding) and, with `flips`, horizontal flips."""
    n, _, h, w = x.shape
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dx, dy = torch.randint(0, 5, (2, n), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if not flips:
        return out
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def fit(images_u8: torch.Tensor, labels: np.ndarray, classes: int, *, steps: int, batch: int,
        lr: float, seed: int, weights: torch.Tensor | None = None, shifts: bool = True,
        flips: bool = True) -> SmallResNet:
    """Train a SmallResNet for `steps` batches drawn with replacement, image i with probability
    proportional to weights[i] (uniform if None); shifts (and flips) augment every batch."""
    torch.manual_seed(mix_seed(seed, 11))
    g = torch.Generator().manual_seed(mix_seed(seed, 12))
    net = SmallResNet(images_u8.shape[1], classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    weights = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights
    targets = torch.from_numpy(np.asarray(labels))
    net.train()
    for _ in range(steps):
        idx = torch.multinomial(weights, batch, replacement=True, generator=g)
        x = batch_to_model(images_u8[idx])
        loss = F.cross_entropy(net(augment(x, g, flips) if shifts else x), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def cached_fit(cache_dir: Path, images_u8: torch.Tensor, labels: np.ndarray, classes: int, *,
               announce: str, log=print, **options) -> SmallResNet:
    """fit(), loaded from `cache_dir` when the same images, labels and options were fitted before
    (the fit is seeded, so the file holds what fitting again would give); `announce` is logged
    when it fits. The images are fitted in the order of their digests, so the same labelled set
    read in another order (a folder against the run that trained on it) gives the same network."""
    from safetensors.torch import load_file

    from ..checkpoint import save_tensors

    order = np.lexsort((np.asarray(labels), np.array(image_digests(images_u8))))
    images_u8, labels = images_u8[torch.from_numpy(order)], np.asarray(labels)[order]
    if options.get("weights") is not None:
        options = options | {"weights": options["weights"][torch.from_numpy(order)]}
    weights = options.get("weights")
    recipe = {k: v for k, v in options.items() if k != "weights"}
    key = hashlib.sha256(images_u8.cpu().numpy().tobytes() + np.asarray(labels).tobytes()
                         + (b"" if weights is None else weights.numpy().tobytes())
                         + json.dumps([classes, recipe], sort_keys=True).encode())
    path = cache_dir / f"classifier_{key.hexdigest()[:24]}.safetensors"
    if path.exists():
        net = SmallResNet(images_u8.shape[1], classes)
        net.load_state_dict(load_file(path))
        return net.eval()
    log(announce)
    net = fit(images_u8, labels, classes, **options)
    with atomic.atomic_path(path) as tmp:
        save_tensors(net.state_dict(), tmp)
    return net


@torch.no_grad()
def predict(net: nn.Module, images_u8: torch.Tensor) -> np.ndarray:
    """Class probabilities, N x classes."""
    return torch.cat([net(batch_to_model(images_u8[i:i + 512])).softmax(1)
                      for i in range(0, len(images_u8), 512)]).numpy()
