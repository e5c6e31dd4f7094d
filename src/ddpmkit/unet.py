"""The DDPM UNet (Ho et al. 2020), configurable.

Block order follows diffusers' UNet2DModel (and the original TF code) so that weights map one to
one: conv_in -> per level [ResBlock (+Attention)] x num_res_blocks (+Downsample) -> mid
[ResBlock, Attention, ResBlock] -> per level [ResBlock (+Attention)] x (num_res_blocks + 1) with
skip concatenation (+Upsample) -> GroupNorm, SiLU, conv_out.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import UserError
from .limits import check_memory, gib

if TYPE_CHECKING:
    from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps. freq_shift=1 and [sin, cos] order
    reproduce the DDPM paper's embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a bf16/fp16 input's precision under autocast, as NVlabs EDM's does.
    Autocast runs group_norm in fp32, so every normalised activation (and the SiLU after it) makes
    an fp32 round trip through memory; the kernel accumulates its statistics in fp32 either way.
    Outside autocast, and for fp32 inputs, it is nn.GroupNorm: CPU training is unchanged bit for
    bit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype),
                                    self.bias.to(x.dtype), self.eps)
        return super().forward(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, through PyTorch's SDPA."""

    def __init__(self, channels: int, head_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.heads = 1 if head_dim is None else max(1, channels // head_dim)
        self.group_norm = GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # B, HW, C

        def heads(t):
            return t.view(b, h * w, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = heads(self.to_q(tokens)), heads(self.to_k(tokens)), heads(self.to_v(tokens))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # TF "SAME" padding for a stride-2 conv on even sizes: one row/column at the end.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the down or up path."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module],
                 resample: nn.Module | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class UNet(nn.Module):
    def __init__(self, cfg: ModelConfig, image_size: int):
        super().__init__()
        if cfg.in_channels is None:
            raise ValueError("ModelConfig.in_channels must be resolved from the data first")
        self.cfg, self.image_size = cfg, image_size
        ch = [cfg.base_channels * m for m in cfg.channel_mult]
        temb_dim = 4 * cfg.base_channels
        g, eps, drop = cfg.norm_groups, cfg.norm_eps, cfg.dropout

        def res(cin, cout):
            return ResBlock(cin, cout, temb_dim, drop, g, eps)

        def attn(c):
            return Attention(c, cfg.attention_head_dim, g, eps)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_linear_1 = nn.Linear(cfg.base_channels, temb_dim)
        self.time_linear_2 = nn.Linear(temb_dim, temb_dim)
        # Class conditioning like diffusers' num_class_embeds: one learned vector per class added to
        # the time embedding. Label -1 adds nothing (unconditional, for classifier-free guidance).
        self.class_embedding = (nn.Embedding(cfg.num_classes, temb_dim) if cfg.num_classes > 0
                                else None)

        n_levels = len(ch)
        use_attn = [image_size // 2**i in cfg.attention_resolutions for i in range(n_levels)]
        self.down = nn.ModuleList()
        skips, cur = [ch[0]], ch[0]
        for i, cout in enumerate(ch):
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks):
                resnets.append(res(cur, cout))
                attns += [attn(cout)] if use_attn[i] else []
                cur = cout
                skips.append(cur)
            last = i == n_levels - 1
            self.down.append(Level(resnets, attns, None if last else Downsample(cur)))
            if not last:
                skips.append(cur)

        self.mid_res_1, self.mid_attn, self.mid_res_2 = res(cur, cur), attn(cur), res(cur, cur)

        self.up = nn.ModuleList()
        for i in reversed(range(n_levels)):
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(res(cur + skips.pop(), ch[i]))
                attns += [attn(ch[i])] if use_attn[i] else []
                cur = ch[i]
            self.up.append(Level(resnets, attns, Upsample(cur) if i > 0 else None))

        self.norm_out = GroupNorm(g, cur, eps=eps)
        self.conv_out = nn.Conv2d(cur, cfg.in_channels, 3, padding=1)
        # non-leaky augmentation (augmentation.py): what was done to the image, added to the time
        # embedding; no bias, so no label (sampling) is "not transformed"; zero at first, so a
        # fine-tuned model starts as its source
        self.augment_embedding = None
        if cfg.augment_dim:
            self.augment_embedding = nn.Linear(cfg.augment_dim, temb_dim, bias=False)
            nn.init.zeros_(self.augment_embedding.weight)
        self.activation_checkpointing = False  # training only: recompute each block in backward

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)  # RNG replayed: same dropout
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                augment: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W); t: (B,) or scalar timesteps, may be fractional; labels: (B,) class
        indices, -1 for none (ignored by an unconditional model, None means all -1); augment:
        (B, augment_dim) augmentation labels in training, None (not transformed) otherwise."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = timestep_embedding(t, self.cfg.base_channels, self.cfg.time_flip_sin_to_cos,
                                  self.cfg.time_freq_shift)
        temb = self.time_linear_2(F.silu(self.time_linear_1(temb.to(x.dtype))))
        if self.class_embedding is not None and labels is not None:
            keep = (labels >= 0).unsqueeze(1)
            temb = temb + self.class_embedding(labels.clamp(min=0)).to(temb.dtype) * keep
        if self.augment_embedding is not None and augment is not None:
            temb = temb + self.augment_embedding(augment.to(temb.dtype))

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for j, block in enumerate(level.resnets):
                h = self._run(block, h, temb)
                if level.attentions:
                    h = self._run(level.attentions[j], h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self._run(self.mid_res_1, h, temb)
        h = self._run(self.mid_res_2, self._run(self.mid_attn, h), temb)

        for level in self.up:
            for j, block in enumerate(level.resnets):
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), temb)
                if level.attentions:
                    h = self._run(level.attentions[j], h)
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


BYTES_PER_PARAMETER = 4 * 5  # training in fp32: weights, gradients, AdamW's two moments, the EMA


def measure(cfg: ModelConfig, image_size: int, flops: bool = False) -> tuple[UNet, int, dict]:
    """Build the UNet on the meta device (nothing is allocated, whatever its widths) and run one
    image through it: (the meta network, bytes autograd saves for its backward pass, FLOPs per
    module if asked, counted by torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = UNet(cfg, image_size)
    x = torch.empty(1, cfg.in_channels, image_size, image_size, device="meta", requires_grad=True)
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    counter = FlopCounterMode(display=False) if flops else contextlib.nullcontext()
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, torch.zeros(1, device="meta"))
    counts = ({name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
              if flops else {})
    return net, saved[0], counts


def sampling_bytes(cfg: ModelConfig, image_size: int) -> int:
    """Memory one image takes in a network call without autograd, measured on the meta device: the
    skip connections the up path waits for, plus six of the largest activation (a block's input,
    its norms, convolutions and the concatenated skip)."""
    with torch.device("meta"):
        net = UNet(cfg, image_size)
    outputs, skips = [], []

    def record(into: list):
        return lambda _module, _inputs, out: into.append(out.numel() * out.element_size())

    kept = [net.conv_in, *(m for level in net.down for m in (*level.resnets, level.resample)
                           if m is not None)]  # what forward() appends to its skips
    leaves = [m for m in net.modules() if not any(m.children())]
    hooks = [m.register_forward_hook(record(outputs)) for m in leaves]
    hooks += [m.register_forward_hook(record(skips)) for m in kept]
    with torch.no_grad():
        net(torch.empty(1, cfg.in_channels, image_size, image_size, device="meta"),
            torch.zeros(1, device="meta"))
    for hook in hooks:
        hook.remove()
    return sum(skips) + 6 * max(outputs)


def check_fits(cfg: ModelConfig, image_size: int, device: torch.device,
               batch: int | None = None) -> None:
    """Refuse a network (and, training, its optimizer state and `batch` images of activations;
    None: not training) that `device` cannot hold, before anything is built: a config's widths can
    ask for terabytes."""
    net, per_image, _ = measure(cfg, image_size)
    params = count_parameters(net)
    weights = params * (4 if batch is None else BYTES_PER_PARAMETER)
    need = weights + (batch or 0) * per_image
    what = (f"the UNet ({params:,} parameters"
            + (f", activations of {batch} images)" if batch else ")"))
    fix = "use a smaller model (model.base_channels, model.channel_mult)" + (
        ", or a smaller train.batch_size or train.grad_accum > 1" if batch else "")
    if device.type == "cuda":  # activations there are autocast's and --max-batch's business
        need = weights
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            raise UserError(f"{what} needs {gib(need)} and {device} has {gib(free)} free: {fix}")
    else:
        check_memory(need, what, fix)
