"""The FID Inception-v3: the network and weights of pytorch-fid (a port of TensorFlow's 2015
Inception graph), written out here so FID needs no torchvision.

It differs from torchvision's Inception-v3 in four places (pytorch-fid's FIDInception* blocks): the
average pools of the A, C and first E blocks exclude padding, the last E block max-pools, and the
classifier has 1008 classes. Inputs are uint8 images; they are resized to 299x299 exactly as
pytorch-fid does (bilinear `F.interpolate`, align_corners=False, no antialiasing) and scaled to
[-1, 1]. Features are the 2048-d pool3 activations. The logits returned with them are pool3 times
the classifier's weights without its bias, over all 1008 classes: what the original Inception Score
code used (torch-fidelity's "logits_unbiased").

Weights: `pt_inception-2015-12-05-6726825d.pth`, loaded with `torch.load(weights_only=True)` and
checked against the SHA-256 prefix in its name (PyTorch hub's convention).
"""

from __future__ import annotations

import http.client
import os
import urllib.error
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import file_sha256
from ..errors import UserError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               f"{WEIGHTS_NAME}")
WEIGHTS_SHA256_PREFIX = "6726825d"
RESIZE = ("bilinear to 299x299 (torch F.interpolate, align_corners=False, no antialias), "
          "as pytorch-fid")


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg3(x)),
        ], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg3(x)),
        ], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # pytorch-fid's FIDInceptionE_2 (the last block) max-pools
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1),
            self.branch_pool(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """Parameter names match pytorch-fid's / torchvision's, so their state dicts
    load as they are."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 N x 3 x H x W -> (pool3 features N x 2048, unbiased logits N x 1008)."""
        x = images_u8.float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d,
                      self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        feats = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return feats, F.linear(feats, self.fc.weight)


def default_weights_path() -> Path:
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return hub / "hub" / "checkpoints" / WEIGHTS_NAME


def load_fid_inception(weights: str | Path | None = None,
                       download: bool = True) -> tuple[FIDInceptionV3, str]:
    """The FID network with the standard weights, and the weights file's SHA-256: from `weights`,
    else PyTorch hub's cache (where pytorch-fid also keeps them), downloading them
    there when online."""
    path = Path(weights) if weights else default_weights_path()
    if not path.is_file():
        if weights:
            raise UserError(f"Inception weights not found: {path}")
        if not download:
            raise UserError(_how_to_get_weights(path))
        path.parent.mkdir(parents=True, exist_ok=True)  # a fresh machine has no hub cache yet
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(path),
                                           hash_prefix=WEIGHTS_SHA256_PREFIX, progress=True)
        except RuntimeError as exc:  # the hash check: a proxy's page or a cut-off download
            raise UserError(f"the file downloaded from {WEIGHTS_URL} is not the Inception weights "
                            f"({exc}): try again, or download it yourself and pass eval "
                            f"--inception-weights FILE") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
            raise UserError(_how_to_get_weights(path)) from None  # offline
        except OSError as exc:
            raise UserError(f"cannot write the Inception weights to {path}: "
                            f"{exc.strerror or exc}; pass eval --inception-weights FILE") from None
    digest = file_sha256(path)
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):
        raise UserError(f"{path} is not the FID Inception weights file (SHA-256 {digest[:8]}..., "
                        f"expected {WEIGHTS_SHA256_PREFIX}...): FID from other weights "
                        f"would not be comparable")
    net = FIDInceptionV3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any failure here means a bad file
        raise UserError(f"cannot load Inception weights {path}: {exc}") from None
    return net.eval().requires_grad_(False), digest


def _how_to_get_weights(path: Path) -> str:
    return (f"FID needs the Inception weights and this machine is offline: download {WEIGHTS_URL} "
            f"and put it at {path} (or pass eval --inception-weights FILE); or use the "
            f"efficientnet features (offline, not comparable with published FID) or the "
            f"classifier's: eval --features, or train.eval_features for training")
