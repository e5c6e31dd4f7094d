"""Tensors <-> uint8 images, PNG files, grids and GIFs. Images leave the library as uint8."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in [0, 255] (rounded, clipped), same shape, on the CPU."""
    return ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of [-1, 1] floats (N x C x H x W) to size x size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x.float(), size=(size, size), mode="bicubic",
                         align_corners=False).clamp(-1, 1)


def to_pil(img: torch.Tensor) -> Image.Image:
    """uint8 C x H x W -> PIL image, mode L for one channel, RGB for three."""
    arr = img.numpy()
    return (Image.fromarray(arr[0], "L") if arr.shape[0] == 1
            else Image.fromarray(np.moveaxis(arr, 0, -1), "RGB"))


def png_bytes(img: torch.Tensor, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    to_pil(img).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def make_grid(images: torch.Tensor, ncol: int | None = None, pad: int = 2) -> torch.Tensor:
    """uint8 N x C x H x W -> one uint8 C x H' x W' image, rows of `ncol`, black padding."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = torch.zeros(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def gif_bytes(frames: list[torch.Tensor], frame_ms: int = 80, hold_last_ms: int = 1500) -> bytes:
    """uint8 C x H x W frames -> an animated GIF that loops and lingers on the last frame."""
    h, w = max(f.shape[-2] for f in frames), max(f.shape[-1] for f in frames)
    # frames of one size (a resume may change train.grid_images): a smaller one would leave the
    # previous frame showing around it
    frames = [F.pad(f, (0, w - f.shape[-1], 0, h - f.shape[-2]), value=255) for f in frames]
    pils = [to_pil(f).convert("P") if f.shape[0] == 3 else to_pil(f) for f in frames]
    durations = [frame_ms] * (len(pils) - 1) + [hold_last_ms]
    buf = io.BytesIO()
    pils[0].save(buf, format="GIF", save_all=True, append_images=pils[1:], duration=durations,
                 loop=0)
    return buf.getvalue()


def scale_for_viewing(img: torch.Tensor, min_side: int = 256) -> torch.Tensor:
    """Nearest-neighbour enlarge small uint8 images (8x8 digits) so a viewer shows pixels, not a
    blur."""
    factor = max(1, math.ceil(min_side / max(img.shape[-2:])))
    return img.repeat_interleave(factor, -2).repeat_interleave(factor, -1) if factor > 1 else img
