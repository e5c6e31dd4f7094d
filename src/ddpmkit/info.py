"""`ddpmkit info`: what a model is and costs, computed on meta tensors (instant, no memory).

Per block: resolution, output channels, attention, parameters and forward FLOPs per image (counted
by `torch.utils.flop_counter`, not by a hand-written formula). Training memory for a batch size is
estimated as weights + gradients + AdamW's two moments + the EMA copy (20 bytes per parameter in
fp32) plus the activations autograd saves for the backward pass, measured for one image and scaled
by the batch (fp32; bf16 autocast roughly halves that part).
"""

from __future__ import annotations

import torch

from .config import Config
from .resolve import architecture
from .unet import BYTES_PER_PARAMETER, measure


def model_info(cfg: Config, batch_sizes: tuple[int, ...] = (1, 8, 32, 128)) -> dict:
    """The model `cfg` describes, its channel count and train.init_from's architecture resolved as
    training will resolve them (resolve.architecture)."""
    cfg, channels_from = architecture(cfg, log=lambda *_: None)
    size, channels = cfg.data.image_size, cfg.model.in_channels
    net, saved, flops = measure(cfg.model, size, flops=True)

    def block_flops(name: str) -> float:
        """FLOPs under UNet.<name>: containers whose forward is never called (a Level) are not
        recorded themselves, so sum their outermost recorded descendants."""
        prefix = f"UNet.{name}"
        keys = [k for k in flops if k == prefix or k.startswith(prefix + ".")]
        outer = [k for k in keys if not any(k != o and k.startswith(o + ".") for o in keys)]
        return sum(flops[k] for k in outer) / 1e9

    def block(name: str, module: torch.nn.Module, resolution: int, attention: bool) -> dict:
        out_channels = [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        return {"block": name, "resolution": resolution,
                "channels": out_channels[-1] if out_channels else None,
                "attention": attention, "parameters": sum(p.numel() for p in module.parameters()),
                "gflops": block_flops(name)}

    rows = [block("conv_in", net.conv_in, size, False)]
    # what the time embedding adds up: the timestep's, the class's and the augmentation's
    embeddings = ("time_linear_1", "time_linear_2", "class_embedding", "augment_embedding")
    modules = [m for m in (getattr(net, name) for name in embeddings) if m is not None]
    rows.append({"block": "embeddings", "resolution": None,
                 "channels": net.time_linear_2.out_features, "attention": False,
                 "parameters": sum(p.numel() for m in modules for p in m.parameters()),
                 "gflops": sum(block_flops(name) for name in embeddings)})
    for i, level in enumerate(net.down):
        rows.append(block(f"down.{i}", level, size // 2**i, bool(level.attentions)))
    bottom = size // 2 ** (len(net.down) - 1)
    for name in ("mid_res_1", "mid_attn", "mid_res_2"):
        rows.append(block(name, getattr(net, name), bottom, name == "mid_attn"))
    for j, level in enumerate(net.up):
        i = len(net.up) - 1 - j
        rows.append(block(f"up.{j}", level, size // 2**i, bool(level.attentions)))
    rows.append(block("norm_out", net.norm_out, size, False))
    rows.append(block("conv_out", net.conv_out, size, False))

    params = sum(p.numel() for p in net.parameters())
    memory = {str(b): round((params * BYTES_PER_PARAMETER + b * saved) / 2**20, 1)
              for b in batch_sizes}
    return {"image_size": size, "channels": channels, "channels_from": channels_from,
            "parameters": params, "gflops_forward_per_image": flops.get("Global", 0) / 1e9,
            "gflops_train_step_per_image": 3 * flops.get("Global", 0) / 1e9,  # backward ~2x forward
            "activation_mib_per_image": round(saved / 2**20, 2),
            "training_memory_mib_by_batch": memory, "blocks": rows}


def format_info(info: dict) -> str:
    lines = [f"{'block':<16}{'res':>5}{'channels':>10}{'attn':>6}{'parameters':>14}{'GFLOPs':>10}"]
    for r in info["blocks"]:
        res = "" if r["resolution"] is None else r["resolution"]
        lines.append(f"{r['block']:<16}{res!s:>5}{r['channels'] or '':>10}"
                     f"{'yes' if r['attention'] else '':>6}"
                     f"{r['parameters']:>14,}{r['gflops']:>10.3f}")
    lines.append(f"total: {info['parameters']:,} parameters; "
                 f"{info['gflops_forward_per_image']:.3f} GFLOPs forward per "
                 f"{info['channels']}x{info['image_size']}x{info['image_size']} image "
                 f"(~{info['gflops_train_step_per_image']:.2f} per training step)")
    mem = ", ".join(f"batch {b}: {m:,.0f} MiB"
                    for b, m in info["training_memory_mib_by_batch"].items())
    lines.append(f"estimated fp32 training memory: {mem}")
    if info["channels_from"].startswith("assumed"):
        lines.append(f"{info['channels']} channels {info['channels_from']}")
    return "\n".join(lines)
