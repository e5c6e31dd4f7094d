"""Augmentation that does not leak into samples (Karras et al. 2022, EDM, appendix C).

Each training image is transformed with probability p per operation, and the network is told how
(a label vector added, through a linear layer, to its time embedding); sampling passes no label,
which is the same as "not transformed", so the samples look like the data, not like its flipped
or shifted copies. On small sets this lets the network see more variety without learning to make
it, which is what keeps it from reproducing its few training images.

    hflip      mirror left-right          label: 1 if mirrored
    vflip      mirror top-bottom          label: 1 if mirrored
    rot90      rotate by 90, 180, 270     label: one-hot of the three (0 0 0: not rotated)
    translate  shift by up to 1/8 of the side, edges reflected   label: (dx, dy) / side
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPERATIONS = {"hflip": 1, "vflip": 1, "rot90": 3, "translate": 2}  # name -> label dimensions


def label_dim(ops: list[str]) -> int:
    return sum(OPERATIONS[op] for op in ops)


@dataclass
class Augmentation:
    """What was done to each image of a batch (all zeros: nothing)."""
    hflip: torch.Tensor  # bool, N
    vflip: torch.Tensor  # bool, N
    rot90: torch.Tensor  # int 0..3, N
    shift: torch.Tensor  # int, N x 2 (dx, dy)
    ops: tuple[str, ...]

    def __getitem__(self, rows: slice) -> Augmentation:
        return Augmentation(self.hflip[rows], self.vflip[rows], self.rot90[rows], self.shift[rows],
                            self.ops)

    def labels(self, size: int) -> torch.Tensor:
        """The network's augmentation label, N x label_dim(ops), in the order of `ops`."""
        parts = {"hflip": self.hflip[:, None].float(), "vflip": self.vflip[:, None].float(),
                 "rot90": F.one_hot(self.rot90, 4)[:, 1:].float(), "translate": self.shift / size}
        return torch.cat([parts[op] for op in self.ops], dim=1)


def draw(ops: tuple[str, ...], p: float, n: int, size: int, g: torch.Generator,
         device: torch.device) -> Augmentation:
    """Each operation applied to each image with probability p (its parameters drawn from g)."""
    def chosen() -> torch.Tensor:
        return torch.rand(n, device=device, generator=g) < p

    none = torch.zeros(n, dtype=torch.bool, device=device)
    hflip = chosen() if "hflip" in ops else none
    vflip = chosen() if "vflip" in ops else none
    turns = torch.randint(1, 4, (n,), device=device, generator=g)
    rot90 = torch.where(chosen(), turns, 0) if "rot90" in ops else none.long()
    reach = max(1, size // 8)
    shift = torch.randint(-reach, reach + 1, (n, 2), device=device, generator=g)
    shift = torch.where(chosen()[:, None], shift, 0) if "translate" in ops else shift * 0
    return Augmentation(hflip, vflip, rot90, shift, ops)


def apply(x: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """The transformed batch (N x C x H x W, square images)."""
    x = torch.where(aug.hflip[:, None, None, None], x.flip(-1), x)
    x = torch.where(aug.vflip[:, None, None, None], x.flip(-2), x)
    for k in (1, 2, 3):
        x = torch.where((aug.rot90 == k)[:, None, None, None], x.rot90(k, (-2, -1)), x)
    if aug.shift.any():
        s, size = int(aug.shift.abs().max()), x.shape[-1]
        padded = F.pad(x, (s, s, s, s), mode="reflect")
        x = torch.stack([padded[i, :, s - dy:s - dy + size, s - dx:s - dx + size]
                         for i, (dx, dy) in enumerate(aug.shift.tolist())])
    return x
