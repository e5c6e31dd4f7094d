"""diffusers' format (UNet2DModel + DDPMScheduler) to and from ddpmkit's, exactly or not at all.

Our UNet is block for block diffusers' UNet2DModel with positional time embedding, conv
down/upsampling with downsample_padding=0, and an optional num_class_embeds class embedding. A
diffusers model is imported only when our UNet computes the same function; every option it cannot
reproduce is refused with a UserError naming it (never approximated).

    unet/config.json + unet/diffusion_pytorch_model.safetensors <-> config.yaml model.* + checkpoint
    scheduler/scheduler_config.json <-> config.yaml diffusion.* (+ sample.*)

Neither direction needs diffusers installed: configs are plain JSON, weights safetensors. A legacy
pickled .bin is refused, never unpickled, with the command that converts it where it is trusted.
The hub is used only for a hub id, and only through huggingface_hub, imported when needed.
`ddpmkit import` and `export` (interop.py) write folders with it; `train.init_from` reads with it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import atomic
from .checkpoint import check_weights, load_into
from .config import UPPER, Config, load_config, updated
from .data import refuse_control_characters
from .errors import UserError, escape_controls
from .schedule import cosine_betas, linear_betas
from .unet import UNet

# The diffusers version whose classes this mapping was checked against (written into exports).
DIFFUSERS_VERSION = "0.42.1"

# UNet2DModel.__init__ defaults in diffusers 0.42: a config.json leaves out keys at their default,
# so a missing key means this value (e.g. downsample_padding 1, flip_sin_to_cos True).
UNET_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}

# DDPMScheduler.__init__ defaults in diffusers 0.42 (DDIMScheduler's match for the keys read here).
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
    "prediction_type": "epsilon", "thresholding": False, "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0, "sample_max_value": 1.0, "timestep_spacing": "leading",
    "steps_offset": 0, "rescale_betas_zero_snr": False,
}

# UNet2DModel options that our UNet implements with exactly these values. act_fn "swish" is silu.
_UNET_FIXED = {
    "time_embedding_type": ("positional",), "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2D",), "mid_block_scale_factor": (1,),
    "downsample_padding": (0,), "downsample_type": ("conv",), "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"), "resnet_time_scale_shift": ("default",), "add_attention": (True,),
    "class_embed_type": (None,),
}
_WHY = {"downsample_padding": "ddpmkit pads one row and column after the image before its "
                              "stride-2 conv, which is downsample_padding=0; padding 1 on every "
                              "side samples a shifted grid"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCES = {"fixed_small": "small", "fixed_large": "large"}
# fixed_small_log draws with exp(0.5 * log(var)) = sqrt(var): "small" again (fixed_large_log is not
# its counterpart: DDPMScheduler takes the square root of log(beta) there, which is NaN)
_VARIANCES_IN = {**_VARIANCES, "fixed_small_log": "small"}
_DOWN, _UP = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")
WEIGHTS = "diffusion_pytorch_model"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# beside model_index.json: what class index i means (ddpmkit exports)
CLASS_NAMES_FILE = "ddpmkit_classes.json"
_HUB_FILES = ["model_index.json", "config.json", "scheduler_config.json", "unet/config.json",
              "scheduler/scheduler_config.json", CLASS_NAMES_FILE]


# ddpmkit keys taken as they are from a UNet2DModel option
_UNET_OPTION_OF = {
    "model.in_channels": "in_channels", "model.num_res_blocks": "layers_per_block",
    "model.attention_head_dim": "attention_head_dim", "model.dropout": "dropout",
    "model.norm_groups": "norm_num_groups", "model.norm_eps": "norm_eps",
    "model.time_flip_sin_to_cos": "flip_sin_to_cos", "model.time_freq_shift": "freq_shift",
}


def _unsupported(key: str, value, allowed=None, owner: str = "UNet2DModel") -> UserError:
    shown = f" (ddpmkit supports {', '.join(json.dumps(a) for a in allowed)})" if allowed else ""
    why = f": {_WHY[key]}" if key in _WHY else ""
    return UserError(f"cannot convert: {owner} option {key}={json.dumps(value)} "
                     f"is not supported{shown}{why}")


def _public(config: dict | None) -> dict:
    return {k: v for k, v in (config or {}).items() if not k.startswith("_")}


# --- configs -----------------------------------------------------------------------------------

def diffusers_config_to_ddpmkit(unet_config: dict, scheduler_config: dict | None = None) -> Config:
    """A diffusers UNet2DModel config (and DDPMScheduler/DDIMScheduler config; None: DDPM defaults)
    -> a validated ddpmkit Config (data.image_size, model.*, diffusion.*, sample.clip_x0/variance).
    Raises UserError naming the first option our UNet or schedule cannot reproduce exactly."""
    cls = unet_config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise UserError(f"cannot convert a diffusers {cls}: only UNet2DModel is supported")
    u = {**UNET_DEFAULTS, **_public(unet_config)}
    for key, allowed in _UNET_FIXED.items():
        if u[key] not in allowed:
            raise _unsupported(key, u[key], allowed)
    channels = u["in_channels"]
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        raise _unsupported("in_channels", channels, ["a positive integer"])
    if u["out_channels"] != channels:
        raise _unsupported("out_channels", u["out_channels"], [channels])

    size = u["sample_size"]
    if isinstance(size, (list, tuple)):  # (height, width): square only
        size = size[0] if len(size) == 2 and size[0] == size[1] else None
    if not isinstance(size, int):
        raise _unsupported("sample_size", u["sample_size"], ["a square size"])

    widths = u["block_out_channels"]
    if not isinstance(widths, (list, tuple)) or not widths or not all(
            isinstance(w, int) and w > 0 for w in widths):
        raise _unsupported("block_out_channels", widths, ["positive integers"])
    base = widths[0]
    if any(w % base for w in widths):
        raise _unsupported("block_out_channels", widths, ["multiples of the first entry"])
    # Our time embedding is 4 * base_channels wide, as diffusers' default for time_embedding_dim.
    if u["time_embedding_dim"] not in (None, 4 * base):
        raise _unsupported("time_embedding_dim", u["time_embedding_dim"], [None, 4 * base])

    attn = _attention_levels(u, len(widths))
    groups = u["norm_num_groups"]
    if not isinstance(groups, int):
        raise _unsupported("norm_num_groups", groups, ["an integer"])
    # Unset, mid-block attention norm takes norm_num_groups (with resnet_time_scale_shift "default")
    if u["attn_norm_num_groups"] not in (None, groups):
        raise _unsupported("attn_norm_num_groups", u["attn_norm_num_groups"], [None, groups])
    # diffusers: heads = channels // attention_head_dim of width attention_head_dim, None = one head
    # of full width; ours the same when the head dim divides every attention width (mid block too).
    head_dim = u["attention_head_dim"]
    attn_widths = [w for w, a in zip(widths, attn) if a] + [widths[-1]]
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1
                                 or any(w % head_dim for w in attn_widths)):
        raise _unsupported("attention_head_dim", head_dim,
                           [None, f"a divisor of {sorted(set(attn_widths))}"])
    classes = u["num_class_embeds"]
    if classes is not None and (not isinstance(classes, int)
                                or not 1 <= classes <= UPPER["model.num_classes"]):
        raise _unsupported("num_class_embeds", classes, [None, "a positive integer"])
    # num_train_timesteps only sizes the embedding table of time_embedding_type "learned", refused
    # above; with "positional" diffusers ignores it, so it changes nothing here.

    overrides = {
        **{ours: u[theirs] for ours, theirs in _UNET_OPTION_OF.items()},
        "model.preset": None, "model.base_channels": base,
        "model.channel_mult": [w // base for w in widths],
        "model.attention_resolutions": [size // 2**i for i, a in enumerate(attn) if a],
        "model.num_classes": classes or 0, "data.image_size": size,
        **_scheduler_overrides(scheduler_config),
    }
    if classes:  # diffusers' UNet always has a class embedding: sample with labels (named by index)
        overrides.update({"model.class_conditional": True,
                          "data.class_names": [str(i) for i in range(classes)]})
    try:
        return load_config(None, overrides)
    except UserError as e:  # named as the user wrote it, in the diffusers config
        named = {**_UNET_OPTION_OF, "data.image_size": "sample_size"}
        key = str(e).removeprefix("config key ").split(":")[0]
        if key not in named:
            raise
        raise UserError(f"cannot convert: UNet2DModel option {named[key]}, read as {e}") from None


def _attention_levels(u: dict, levels: int) -> list[bool]:
    """Which of the `levels` down blocks have attention; refused unless the up path mirrors them
    (ddpmkit's UNet puts attention on the same resolutions going down and up)."""
    down, up = list(u["down_block_types"]), list(u["up_block_types"])
    if len(down) != levels or len(up) != levels:
        raise UserError(f"cannot convert: UNet2DModel has {levels} block_out_channels but "
                        f"{len(down)} down_block_types and {len(up)} up_block_types")
    for key, types, allowed in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        for t in types:
            if t not in allowed:
                raise _unsupported(key, t, allowed)
    attn = [t == "AttnDownBlock2D" for t in down]
    if attn != [t == "AttnUpBlock2D" for t in reversed(up)]:
        raise UserError(f"cannot convert: attention in down_block_types {down} and "
                        f"up_block_types {up} is not mirrored (ddpmkit uses the same attention "
                        f"resolutions on both paths)")
    return attn


def _scheduler_overrides(scheduler_config: dict | None) -> dict:
    owner = (scheduler_config or {}).get("_class_name", "DDPMScheduler")
    # variance_type None: a model that predicts no variance (DPMSolverMultistepScheduler's default)
    s = {**SCHEDULER_DEFAULTS, **{k: v for k, v in _public(scheduler_config).items()
                                  if (k, v) != ("variance_type", None)}}
    # both change the process, not just the sampler
    for key in ("thresholding", "rescale_betas_zero_snr"):
        if s[key]:
            raise _unsupported(key, s[key], [False], owner)
    for key in ("prediction_type", "variance_type", "beta_schedule"):
        if not isinstance(s[key], str):  # a list or a mapping would not even compare
            raise _unsupported(key, s[key], ["a name"], owner)
    if s["prediction_type"] not in _PREDICTIONS:
        raise _unsupported("prediction_type", s["prediction_type"], list(_PREDICTIONS), owner)
    if s["variance_type"] not in _VARIANCES_IN:
        raise _unsupported("variance_type", s["variance_type"], list(_VARIANCES_IN), owner)
    if not isinstance(s["clip_sample"], bool):  # the string "false" is truthy
        raise _unsupported("clip_sample", s["clip_sample"], [True, False], owner)
    if s["clip_sample"] and s["clip_sample_range"] != 1.0:  # our clip_x0 clips to [-1, 1]
        raise _unsupported("clip_sample_range", s["clip_sample_range"], [1.0], owner)

    T, start, end = s["num_train_timesteps"], s["beta_start"], s["beta_end"]
    if s["trained_betas"] is not None:
        # Explicit betas are kept only if one of our schedules (to the float32 they are stored in).
        try:
            betas = np.asarray(s["trained_betas"], dtype=np.float64)
        except (TypeError, ValueError):
            betas = None
        if betas is None or betas.ndim != 1:
            raise _unsupported("trained_betas", s["trained_betas"], ["a list of numbers"], owner)
        T = len(betas)
        candidates = {"linear": linear_betas(T, start, end), "cosine": cosine_betas(T)}
        schedule = next((name for name, ref in candidates.items()
                         if np.allclose(betas, ref, rtol=1e-6, atol=0)), None)
        if schedule is None:
            raise UserError(f"cannot convert: {owner} option trained_betas is not supported "
                            f"unless it equals the linear ({start}..{end}) or cosine schedule "
                            f"of {T} steps")
    else:
        # squaredcos_cap_v2 is diffusers' name for Nichol & Dhariwal's cosine schedule: the same
        # formula (s = 0.008, betas capped at 0.999) as schedule.cosine_betas; tests compare them.
        schedule = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(s["beta_schedule"])
        if schedule is None:
            raise _unsupported("beta_schedule", s["beta_schedule"],
                               ["linear", "squaredcos_cap_v2"], owner)
    betas = {"diffusion.beta_start": start, "diffusion.beta_end": end} if (
        schedule == "linear") else {}
    return {"diffusion.num_timesteps": T, "diffusion.schedule": schedule, **betas,
            "diffusion.prediction": _PREDICTIONS[s["prediction_type"]],
            "sample.clip_x0": s["clip_sample"],
            "sample.variance": _VARIANCES_IN[s["variance_type"]]}


def ddpmkit_to_diffusers_config(cfg: Config) -> tuple[dict, dict]:
    """A ddpmkit Config -> (UNet2DModel config.json, DDPMScheduler scheduler_config.json), every key
    written out so diffusers fills in nothing itself."""
    m, d, size = cfg.model, cfg.diffusion, cfg.data.image_size
    if m.in_channels is None:
        raise UserError("cannot export: model.in_channels is not set")
    # diffusers' sinusoidal embedding is block_out_channels[0] wide, ours base_channels wide.
    if m.channel_mult[0] != 1:
        raise UserError(f"cannot export model.channel_mult={m.channel_mult} to diffusers: "
                        f"it must start with 1 "
                        f"(UNet2DModel's time embedding is as wide as its first block)")
    widths = [m.base_channels * k for k in m.channel_mult]
    attn = [size // 2**i in m.attention_resolutions for i in range(len(widths))]
    attn_widths = [w for w, a in zip(widths, attn) if a] + [widths[-1]]
    head_dim = m.attention_head_dim
    if head_dim is not None and any(w % head_dim for w in attn_widths):
        if any(w // head_dim > 1 for w in attn_widths):
            raise UserError(f"cannot export model.attention_head_dim={head_dim}: diffusers needs "
                            f"it to divide every attention width {sorted(set(attn_widths))}")
        head_dim = None  # ours has one full-width head everywhere: diffusers' None
    unet = {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION, **UNET_DEFAULTS,
        "sample_size": size, "in_channels": m.in_channels, "out_channels": m.in_channels,
        "freq_shift": (int(m.time_freq_shift) if float(m.time_freq_shift).is_integer()
                       else m.time_freq_shift),
        "flip_sin_to_cos": m.time_flip_sin_to_cos, "down_block_types": [_DOWN[a] for a in attn],
        "up_block_types": [_UP[a] for a in reversed(attn)],
        "block_out_channels": widths, "layers_per_block": m.num_res_blocks, "downsample_padding": 0,
        "dropout": m.dropout, "attention_head_dim": head_dim, "norm_num_groups": m.norm_groups,
        "norm_eps": m.norm_eps, "num_class_embeds": m.num_classes or None,
    }
    scheduler = {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        **SCHEDULER_DEFAULTS,
        "num_train_timesteps": d.num_timesteps,
        **({"beta_start": d.beta_start, "beta_end": d.beta_end} if d.schedule == "linear" else {}),
        "beta_schedule": {"linear": "linear", "cosine": "squaredcos_cap_v2"}[d.schedule],
        "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[d.prediction],
        "clip_sample": cfg.sample.clip_x0,
        "variance_type": {v: k for k, v in _VARIANCES.items()}[cfg.sample.variance],
    }
    return unet, scheduler


# --- weights -----------------------------------------------------------------------------------

# Training only (non-leaky augmentation): sampling never uses it, so it is not exported.
TRAINING_ONLY = "augment_embedding."


def _module_pairs(net: UNet) -> dict[str, str]:
    """Our module path -> diffusers' module path, walking the levels and their blocks."""
    pairs = {"conv_in": "conv_in", "time_linear_1": "time_embedding.linear_1",
             "time_linear_2": "time_embedding.linear_2", "mid_res_1": "mid_block.resnets.0",
             "mid_attn": "mid_block.attentions.0", "mid_res_2": "mid_block.resnets.1",
             "norm_out": "conv_norm_out", "conv_out": "conv_out"}
    if net.class_embedding is not None:
        pairs["class_embedding"] = "class_embedding"
    for side, blocks, resample in (("down", "down_blocks", "downsamplers.0"),
                                   ("up", "up_blocks", "upsamplers.0")):
        for i, level in enumerate(getattr(net, side)):  # up levels: diffusers' order, bottom first
            for kind in ("resnets", "attentions"):
                for j in range(len(getattr(level, kind))):
                    pairs[f"{side}.{i}.{kind}.{j}"] = f"{blocks}.{i}.{kind}.{j}"
            if level.resample is not None:
                pairs[f"{side}.{i}.resample"] = f"{blocks}.{i}.{resample}"
    return pairs


def state_dict_names(cfg: Config) -> dict[str, str]:
    """Every tensor name of our UNet for `cfg` -> its name in diffusers' UNet2DModel."""
    with torch.device("meta"):  # structure only, no memory
        net = UNet(cfg.model, cfg.data.image_size)
    names = {}
    for ours, theirs in _module_pairs(net).items():
        for param in net.get_submodule(ours).state_dict():
            # diffusers' attention output is a ModuleList (linear, dropout): to_out.0
            names[f"{ours}.{param}"] = f"{theirs}.{param.replace('to_out.', 'to_out.0.')}"
    # a module added to UNet but not to _module_pairs must fail loudly, not be dropped
    ours = {k for k in net.state_dict() if not k.startswith(TRAINING_ONLY)}
    assert names.keys() == ours, sorted(ours ^ set(names))[:5]
    return names


def _rename(weights: dict[str, torch.Tensor], names: dict[str, str],
            what: str) -> dict[str, torch.Tensor]:
    missing = [k for k in names if k not in weights]
    unexpected = [k for k in weights if k not in names]
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise UserError(f"{what} do not fit the configured architecture ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors; first: {first})")
    return {names[k]: v for k, v in weights.items()}


# diffusers < 0.15 named the attention projections query/key/value/proj_attn; it still loads them.
_LEGACY = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_to_ddpmkit_state_dict(weights: dict[str, torch.Tensor],
                                    cfg: Config) -> dict[str, torch.Tensor]:
    """UNet2DModel tensors -> ours, by name; every tensor must have its place (UserError
    otherwise)."""
    weights = {_LEGACY.sub(lambda m: f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}", k): v
               for k, v in weights.items()}
    inverse = {theirs: ours for ours, theirs in state_dict_names(cfg).items()}
    return _rename(weights, inverse, "the diffusers weights")


def ddpmkit_to_diffusers_state_dict(weights: dict[str, torch.Tensor],
                                    cfg: Config) -> dict[str, torch.Tensor]:
    """Our UNet's tensors -> UNet2DModel's, by name; every tensor but the training-only ones must
    have its place."""
    weights = {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY)}
    return _rename(weights, state_dict_names(cfg), "the ddpmkit weights")


def _read_json(path: Path) -> dict:
    try:
        data = atomic.read_json(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _locate(folder: Path) -> tuple[Path, Path | None]:
    """-> (the folder holding the UNet's config.json and weights, the scheduler config or None).
    A pipeline folder has unet/ and scheduler/; a bare UNet folder (save_pretrained of the model, or
    an old hub repo's flat layout) has config.json, perhaps with scheduler_config.json beside it."""
    if _present(folder / "unet" / "config.json"):
        unet, scheduler = folder / "unet", folder / "scheduler" / "scheduler_config.json"
    elif _present(folder / "config.json"):
        unet, scheduler = folder, folder / "scheduler_config.json"
    else:
        raise UserError(f"{folder} is not a diffusers folder: expected unet/config.json "
                        f"(a pipeline) or config.json (a UNet2DModel)")
    return unet, scheduler if _present(scheduler) else None


def _present(path: Path) -> bool:
    """There, readable or not: a dangling link or a pipe where a config belongs is refused when it
    is read, never taken for no config (and its defaults)."""
    return path.exists() or path.is_symlink()


def _check_pipeline(folder: Path) -> None:
    """A pipeline whose UNet works on something other than pixels (a latent pipeline's VAE or
    VQ-VAE space) would import without error and sample noise: refused by its model_index.json."""
    if not _present(folder / "model_index.json"):
        return
    index = _read_json(folder / "model_index.json")
    latent = sorted(k for k in ("vae", "vqvae", "text_encoder") if k in index)
    unet = index.get("unet")
    if latent or (isinstance(unet, list) and unet[-1:] != ["UNet2DModel"]):
        what = f"a {', '.join(latent)}" if latent else f"a {unet[-1] if unet else 'nameless unet'}"
        raise UserError(f"{folder / 'model_index.json'} describes "
                        f"{index.get('_class_name', 'a pipeline')} with {what}: ddpmkit imports "
                        f"pixel-space DDPM pipelines (a UNet2DModel and a scheduler) only")


def _read_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    path = unet_dir / f"{WEIGHTS}.safetensors"
    if not path.is_file():
        if (unet_dir / f"{WEIGHTS}.bin").is_file():  # a pickle can run code when loaded: never here
            raise UserError(f"{unet_dir / f'{WEIGHTS}.bin'} is a pickle, "
                            f"which ddpmkit never loads: if you trust it, convert it with "
                            f"diffusers: python -c \"from diffusers import UNet2DModel as U; "
                            f"U.from_pretrained('{unet_dir}').save_pretrained('{unet_dir}')\" "
                            f"(writes .safetensors)")
        found = ", ".join(sorted(p.name for p in unet_dir.iterdir())) or "nothing"
        raise UserError(f"no {WEIGHTS}.safetensors in {unet_dir} (found: {found}); sharded, "
                        f"variant (fp16) and pickled (.bin) weight files are not supported")
    try:
        weights = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- a damaged or foreign file: safetensors errors vary
        raise UserError(f"cannot read {path}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    bad = next((k for k, v in weights.items()
                if not v.is_floating_point() or not torch.isfinite(v).all()), None)
    if bad is not None:  # a network of them samples NaN, or was not trained as a network
        raise UserError(f"{path}: tensor {bad} is not finite floating-point weights "
                        f"({weights[bad].dtype}): the file is damaged or not a trained model")
    return {k: v.float() for k, v in weights.items()}  # fp16 -> fp32 is exact


def _fetch(source: str, log) -> tuple[Path, str]:
    """A local folder as is, or a hub id downloaded by huggingface_hub -> (folder, where from)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path} is a file: pass the diffusers folder holding it")
        return path, str(path.resolve())
    if not _HUB_ID.match(source) or path.parent.is_dir():  # runs/typo: a path, not a repo
        raise UserError(f"{source}: no such folder "
                        f"(pass a diffusers folder, or a hub id like google/ddpm-cifar10-32)")
    hint = (f"download it on a machine with network (hf download {source} "
            f"--local-dir DIR) and pass the folder DIR instead")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{source} is not a local folder and huggingface_hub is not installed: "
                        f"pip install huggingface_hub, or {hint}") from None
    log(f"downloading {source} from the Hugging Face hub")
    try:
        folder = Path(snapshot_download(source, allow_patterns=_HUB_FILES + [
            f"{WEIGHTS}.safetensors", f"unet/{WEIGHTS}.safetensors"]))
    except Exception as exc:  # noqa: BLE001 -- offline, unknown or gated repo: many error types
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"{source} is not a local folder, and downloading it from the Hugging Face "
                        f"hub failed ({type(exc).__name__}: {first}); {hint}") from None
    return folder, f"https://huggingface.co/{source}"


def read_diffusers(source: str | Path, log=print) -> tuple[Config, UNet, dict]:
    """A diffusers pipeline folder, UNet2DModel folder or hub id -> (its Config, our UNet holding
    its weights, provenance for meta.json). Writes nothing: also what training's --init-from
    needs."""
    folder, origin = _fetch(str(source), log)
    _check_pipeline(folder)
    unet_dir, scheduler_path = _locate(folder)
    unet_config = _read_json(unet_dir / "config.json")
    scheduler_config = _read_json(scheduler_path) if scheduler_path else None
    if scheduler_config is None:
        log(f"note: no scheduler config in {folder}; assuming DDPMScheduler defaults "
            f"(1000 steps, linear betas 0.0001..0.02, epsilon prediction)")
    elif (scheduler_config.get("_class_name", "DDPMScheduler")
          not in ("DDPMScheduler", "DDIMScheduler")):
        log(f"note: {scheduler_config['_class_name']}: "
            f"only its noise schedule and prediction type are imported")
    unknown = sorted(set(_public(unet_config)) - set(UNET_DEFAULTS))
    if unknown:  # diffusers 0.42 ignores them too (with a warning): they change nothing it builds
        log(f"note: ignoring UNet2DModel config keys unknown to diffusers {DIFFUSERS_VERSION}: "
            f"{', '.join(unknown)}")
    cfg = diffusers_config_to_ddpmkit(unet_config, scheduler_config)
    ours = _read_json(folder / CLASS_NAMES_FILE) if _present(folder / CLASS_NAMES_FILE) else {}
    names, dropout = ours.get("class_names"), ours.get("label_dropout")
    known = isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1
    if dropout is not None and not known:
        raise UserError(f"{folder / CLASS_NAMES_FILE}: label_dropout {escape_controls(dropout)} is "
                        f"not a share in [0, 1); fix or remove the file")
    if cfg.model.class_conditional:  # unknown counts as none: guidance needs the unconditional one
        cfg = updated(cfg, {"train.label_dropout": float(dropout) if known else 0.0})
    if names is not None and cfg.model.class_conditional:  # from a ddpmkit export
        if not (isinstance(names, list) and len(names) == cfg.model.num_classes
                and all(isinstance(n, str) and n.strip() for n in names)
                and len(set(names)) == len(names)):
            raise UserError(f"{folder / CLASS_NAMES_FILE}: class_names must be "
                            f"{cfg.model.num_classes} distinct names, one per class of the model; "
                            f"fix or remove the file")
        refuse_control_characters(names, str(folder / CLASS_NAMES_FILE))
        cfg = updated(cfg, {"data.class_names": names})
    weights = diffusers_to_ddpmkit_state_dict(_read_weights(unet_dir), cfg)
    with torch.device("meta"):  # the config's net checked against the weights before it is built
        check_weights(UNet(cfg.model, cfg.data.image_size), weights, f"the weights in {unet_dir}")
    net = UNet(cfg.model, cfg.data.image_size)
    load_into(net, weights, f"the weights in {unet_dir}")
    provenance = {"imported_from": origin, "diffusers_unet_config": unet_config,
                  "diffusers_scheduler_config": scheduler_config,
                  "label_dropout_known": known or not cfg.model.class_conditional}
    return cfg, net.eval(), provenance


