"""A network trained on size x size images, applied to larger ones tile by tile.

`TiledNet(net, size)` takes N x C x H x W inputs with H, W >= size, runs `net` on overlapping
size x size tiles (all tiles of the batch in one call) and blends the tiles' outputs with a tent
window that is largest at a tile's centre, so every pixel is a weighted mean of the predictions of
the tiles covering it and no seam falls on a tile's edge. The network's output (eps, x0 or v) is
linear per pixel in what the samplers use, so blending it at every network call is blending the
denoiser's estimates (MultiDiffusion, Bar-Tal et al. 2023, does the same per step). An input of
exactly the tile size goes straight through.
"""

from __future__ import annotations

import math

import torch

OVERLAP_FRACTION = 4  # neighbouring tiles share size // 4 pixels (at least)


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Where tiles of `size` start along an axis of `length` >= size: evenly spread from 0 to
    length - size, as few as cover it with at least `overlap` pixels shared by neighbours."""
    if length <= size:
        return [0]
    count = math.ceil((length - overlap) / (size - overlap))
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


def tent_window(size: int) -> torch.Tensor:
    """size x size weights, 1 at the centre falling linearly towards the edges (never to 0, so a
    pixel only one tile covers keeps its prediction)."""
    ramp = torch.minimum(torch.arange(size) + 0.5, size - torch.arange(size) - 0.5) / (size / 2)
    return ramp[:, None] * ramp[None, :]


class TiledNet(torch.nn.Module):
    """`chunk`: the most tiles one network call takes (a large image has many). Tiled outputs are
    float32 (the Denoiser works in float32)."""

    def __init__(self, net: torch.nn.Module, size: int, chunk: int = 64):
        super().__init__()
        self.net, self.size, self.chunk = net, size, chunk
        self.overlap = size // OVERLAP_FRACTION

    def forward(self, x: torch.Tensor, t: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        if (h, w) == (self.size, self.size):
            return self.net(x, t) if labels is None else self.net(x, t, labels)
        s = self.size
        if min(h, w) < s:
            raise ValueError(f"tiles of {s}x{s} do not fit a {w}x{h} input")
        corners = [(top, left) for top in tile_starts(h, s, self.overlap)
                   for left in tile_starts(w, s, self.overlap)]
        window = tent_window(s).to(x.device)
        weight = torch.zeros(h, w, device=x.device)
        for top, left in corners:
            weight[top:top + s, left:left + s] += window
        # (image, tile) pairs, `chunk` to a network call, each blended in as it comes: memory holds
        # one chunk of tiles, however large the images
        pairs = [(i, top, left) for top, left in corners for i in range(n)]
        total = torch.zeros(x.shape, device=x.device)  # shaped like the input (eps, x0 or v)
        for k in range(0, len(pairs), self.chunk):
            part = pairs[k:k + self.chunk]
            rows = torch.tensor([i for i, _, _ in part], device=x.device)
            tiles = torch.stack([x[i, :, top:top + s, left:left + s] for i, top, left in part])
            out = self.net(tiles, t[rows], *(() if labels is None else (labels[rows],))).float()
            for (i, top, left), tile_out in zip(part, out):
                total[i, :, top:top + s, left:left + s] += tile_out * window
        return total / weight
