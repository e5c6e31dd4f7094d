"""Configuration: five dataclass sections, YAML in and out, dotted overrides, strict validation.

Resolution order: dataclass defaults <- model preset <- YAML file <- `section.key=value` overrides.
Unknown keys and wrong types are `UserError`s that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError


@dataclass
class DataConfig:
    path: Optional[str] = None  # None: scikit-learn's bundled digits (1797 images, 8x8)
    image_size: int = 8
    channels: Optional[int] = None  # None keeps the data's own (grayscale stays grayscale)
    # integer pixels wider than 8 bits (16-bit PNG/TIFF, uint16 arrays) span 0..2**bit_depth-1 (8..16); None:
    # the smallest of 8, 10, 12, 14, 16 bits holding the data's largest value, recorded by a run at its start;
    # 0: 8 bits if they fit, else 16, as runs from before this key read them
    bit_depth: Optional[int] = None
    hflip: bool = False
    labels: Optional[str] = None  # CSV with an image-name column and a label column
    image_column: str = "image"
    label_column: str = "label"
    filter_label: Optional[str] = None  # keep only rows whose label equals this
    split: str = "train"  # .npz {split}_images / {split}_labels, IDX train or test, or a train/val/test subfolder
    class_names: Optional[list[str]] = None  # resolved from the labels for a class-conditional model (index = class id)
    on_error: str = "skip"  # unreadable images: skip (and report) or fail
    stream: bool = False  # read batches from disk (.npy memory-mapped, folders decoded lazily): RAM stays flat
    workers: int = 4  # with stream: DataLoader worker processes decoding ahead of the GPU


@dataclass
class ModelConfig:
    preset: Optional[str] = "small"  # "small", "ddpm-cifar10" or null; explicit keys override it
    in_channels: Optional[int] = None  # None: taken from the data
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=list)
    attention_head_dim: Optional[int] = None  # None: one head per attention layer
    dropout: float = 0.0
    norm_groups: int = 32
    norm_eps: float = 1e-6
    time_flip_sin_to_cos: bool = False  # embedding order [sin, cos] as in DDPM; diffusers' option
    time_freq_shift: float = 1.0  # DDPM divides frequencies by (half - 1)
    compile: bool = False  # torch.compile the network for training (CUDA; minutes of compilation first)
    compile_mode: str = "default"  # torch.compile's mode (with compile=true): default | reduce-overhead | ...
    class_conditional: bool = False  # learn p(x | class) from the data's labels (CSV, class subfolders, .npz, digits)
    num_classes: int = 0  # the class embedding's size; set from the labels when class_conditional


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    schedule: str = "linear"  # linear | cosine
    # linear schedule; None: Ho et al.'s 1e-4 and 0.02 scaled by 1000/T (Nichol & Dhariwal's rule, the
    # same at T=1000), so any T ends near pure noise; explicit values are taken as given
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    prediction: str = "eps"  # eps | x0 | v

    def __post_init__(self):
        T = self.num_timesteps
        if isinstance(T, int) and not isinstance(T, bool) and T > 0:  # else refused in _check_values
            if self.beta_start is None:
                self.beta_start = 1e-4 * 1000 / T
            if self.beta_end is None:
                self.beta_end = min(0.02 * 1000 / T, 0.999)  # capped below 1, as the cosine schedule is


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    batch_size: int = 128  # global batch per optimizer step, whatever the number of processes and grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step (each process takes batch_size / (processes * grad_accum))
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower
    dist_timeout_minutes: float = 60.0  # torchrun: how long a process waits for the others (rank 0 sampling grids, evaluating)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 200
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    max_steps: int = 4000
    max_minutes: float = 0.0  # 0: no time budget
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)
    channels_last: bool = True  # CUDA: channels_last tensors (false: NCHW); which is faster is not yet measured
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    sample_every: int = 500
    grid_images: int = 16
    grid_steps: int = 50
    checkpoint_every: int = 500
    keep_last: int = 3
    max_nonfinite: int = 20  # stop after this many non-finite losses in a row (each one is skipped)
    eval_every: int = 0  # 0: off; else evaluate at checkpoints whose step is a multiple of this
    eval_num: int = 500  # samples per evaluation (dpmpp-2m, 20 steps, EMA weights)
    eval_features: str = "classifier"  # classifier (needs labels) | efficientnet | inception
    label_dropout: float = 0.1  # class-conditional: share of labels dropped, which trains the unconditional model CFG needs
    init_from: Optional[str] = None  # pretrained weights to start from: a ddpmkit run, or a diffusers folder / hub id
    tensorboard: bool = False  # also log scalars and sample grids to RUN/tensorboard (pip install tensorboard)


@dataclass
class SampleConfig:
    out_dir: str = "samples"
    num: int = 64
    sampler: str = "dpmpp-2m"  # ddpm | ddim | dpmpp-2m | dpmpp-2m-sde | euler | heun (RESULTS.md: quality per step)
    steps: Optional[int] = None  # None: the sampler's default (all T for ddpm)
    eta: float = 0.0
    spacing: str = "uniform"  # uniform | quadratic | trailing | karras
    variance: str = "small"  # ddpm only: small (posterior) | large (beta)
    clip_x0: bool = True
    batch_size: int = 256
    seed: int = 0
    checkpoint: str = "latest"  # latest | best | a step number
    ema: bool = True
    size: Optional[int] = None  # bicubic upsampling of the output
    gif: bool = False
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False  # torch.compile the network (pays off for large jobs on GPUs)
    compile_mode: str = "default"  # torch.compile's mode (with compile=true); reduce-overhead adds CUDA graphs
    class_label: Optional[str] = None  # class-conditional models: the class to generate (None: classes in turn)
    guidance: float = 1.0  # classifier-free guidance: 0 unconditional, 1 conditional, >1 stronger
    writers: int = 2  # background threads encoding and writing PNGs


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}

MODEL_PRESETS = {
    # CPU-friendly: 0.92M parameters (1 channel), two levels, no attention; the defaults.
    "small": dict(base_channels=32, channel_mult=[1, 2], num_res_blocks=2,
                  attention_resolutions=[], dropout=0.0),
    # Ho et al. 2020's CIFAR-10 network (35,746,307 parameters with 3 channels at 32x32),
    # block for block the layout of diffusers' UNet2DModel for google/ddpm-cifar10-32.
    "ddpm-cifar10": dict(base_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                         attention_resolutions=[16], dropout=0.1, attention_head_dim=None),
}

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

LEGACY_BIT_DEPTH = 0  # data.bit_depth of runs from before the key: wide pixels as 8 bits if they fit, else 16

CHOICES = {
    "data.on_error": ("skip", "fail"),
    "data.channels": (None, 1, 3),
    "data.bit_depth": (None, LEGACY_BIT_DEPTH, *range(8, 17)),
    "model.preset": (None, *MODEL_PRESETS),
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.prediction": ("eps", "x0", "v"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.eval_features": ("classifier", "efficientnet", "inception"),
    "sample.sampler": ("ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde", "euler", "heun"),
    "sample.spacing": ("uniform", "quadratic", "trailing", "karras"),
    "sample.precision": ("auto", "fp32", "bf16"),
    "sample.variance": ("small", "large"),
    "model.compile_mode": COMPILE_MODES,
    "sample.compile_mode": COMPILE_MODES,
}

POSITIVE = {
    "data.image_size", "model.base_channels", "model.num_res_blocks", "model.norm_groups",
    "diffusion.num_timesteps", "train.batch_size", "train.max_steps", "train.log_every",
    "train.sample_every", "train.checkpoint_every", "train.keep_last", "train.grid_images",
    "train.grid_steps", "train.max_nonfinite", "train.eval_num", "train.grad_accum", "train.dist_timeout_minutes",
    "sample.num", "sample.batch_size", "sample.size", "sample.steps", "sample.writers",
    "model.in_channels", "model.attention_head_dim", "model.norm_eps",
}
NON_NEGATIVE = {
    "train.lr", "train.weight_decay", "train.warmup_steps", "train.grad_clip", "train.eval_every",
    "train.max_minutes", "model.dropout", "sample.eta", "train.label_dropout", "sample.guidance", "train.seed",
    "sample.seed", "model.num_classes", "data.workers",
}


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the field type `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (elem,) = typing.get_args(tp)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, elem) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan passes every < and > check below, and trains or samples nothing
                raise UserError(f"config key {key}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")


def _section_from_dict(name: str, values: dict) -> Any:
    cls = _SECTION_CLASSES[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"unknown config key {name}.{key} (known keys in '{name}': {', '.join(sorted(known))})")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _check_each_key(flat: dict) -> None:
    """The checks of single keys (choices, signs) for those in `flat`."""
    for key, allowed in CHOICES.items():
        if key in flat and flat[key] not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise UserError(f"config key {key}: {flat[key]!r} is not one of: {shown}")
    for key in POSITIVE:
        if key in flat and flat[key] is not None and flat[key] <= 0:
            raise UserError(f"config key {key}: must be positive, got {flat[key]}")
    for key in NON_NEGATIVE:
        if key in flat and flat[key] < 0:
            raise UserError(f"config key {key}: must not be negative, got {flat[key]}")


def data_config(overrides: dict[str, Any]) -> DataConfig:
    """A data section on its own (an evaluation reference): checked as data, not against a model."""
    other = [k for k in overrides if not k.startswith("data.")]
    if other:
        raise UserError(f"only data.* keys describe a dataset here, got {other[0]}")
    data = _section_from_dict("data", {k.removeprefix("data."): v for k, v in overrides.items()})
    _check_each_key({f"data.{k}": v for k, v in dataclasses.asdict(data).items()})
    return data


def _check_values(cfg: Config) -> None:
    _check_each_key(flatten(cfg.to_dict()))
    m = cfg.model
    if not m.channel_mult or any(c <= 0 for c in m.channel_mult):
        raise UserError(f"config key model.channel_mult: needs positive entries, got {m.channel_mult}")
    if m.base_channels % m.norm_groups:
        raise UserError(f"config key model.base_channels: {m.base_channels} is not divisible by "
                        f"model.norm_groups={m.norm_groups}")
    factor = 2 ** (len(m.channel_mult) - 1)
    if cfg.data.image_size % factor or cfg.data.image_size < 2 * factor:
        # below 2x2 at the bottom, GroupNorm would normalise single values
        raise UserError(f"config key data.image_size: {cfg.data.image_size} cannot pass through "
                        f"{len(m.channel_mult) - 1} halvings to at least 2x2 (model.channel_mult={m.channel_mult}); "
                        f"use a multiple of {factor}, at least {2 * factor}")
    for key, value in (("train.ema_decay", cfg.train.ema_decay), ("model.dropout", m.dropout)):
        if not 0 <= value < 1:
            raise UserError(f"config key {key}: must be in [0, 1), got {value}")
    if not 0 <= cfg.train.label_dropout <= 1:
        raise UserError(f"config key train.label_dropout: a share of labels, in [0, 1], got {cfg.train.label_dropout}")
    if m.attention_head_dim is not None:
        levels = level_resolutions(cfg)  # attention levels, and the middle block at the last one
        widths = sorted({m.base_channels * c for i, (c, level) in enumerate(zip(m.channel_mult, levels))
                         if level in m.attention_resolutions or i == len(levels) - 1})
        # a layer of C channels has max(1, C // head_dim) heads (as in diffusers), which must split C evenly
        bad = [w for w in widths if w % max(1, w // m.attention_head_dim)]
        if bad:
            raise UserError(f"config key model.attention_head_dim: {m.attention_head_dim} makes "
                            f"{bad[0] // m.attention_head_dim} heads of the {bad[0]} channels of a level, which do not "
                            f"split evenly; use a divisor of {bad[0]}")
    d = cfg.diffusion
    if d.schedule == "linear" and not 0 < d.beta_start < d.beta_end < 1:
        raise UserError("config keys diffusion.beta_start/beta_end: need 0 < beta_start < beta_end < 1")
    if cfg.sample.steps is not None and cfg.sample.steps > d.num_timesteps:
        raise UserError(f"config key sample.steps: {cfg.sample.steps} is more than "
                        f"diffusion.num_timesteps={d.num_timesteps}")


def level_resolutions(cfg: Config) -> list[int]:
    """The side of the feature maps at each level of the UNet, from the top."""
    return [cfg.data.image_size // 2**i for i in range(len(cfg.model.channel_mult))]


def check_attention_resolutions(cfg: Config) -> None:
    """A new model's attention resolutions must each be one of its levels' (runs made before this
    check may hold others, which never added attention: they still load)."""
    levels = level_resolutions(cfg)
    unmatched = [r for r in cfg.model.attention_resolutions if r not in levels]
    if unmatched:
        from_preset = cfg.model.preset and MODEL_PRESETS[cfg.model.preset]["attention_resolutions"] == \
            cfg.model.attention_resolutions
        preset = f", from model.preset={cfg.model.preset}" if from_preset else ""
        raise UserError(f"config key model.attention_resolutions={cfg.model.attention_resolutions}{preset}: no level "
                        f"of this model is {unmatched[0]}x{unmatched[0]} (data.image_size={cfg.data.image_size}, "
                        f"model.channel_mult={cfg.model.channel_mult}: levels {', '.join(map(str, levels))}), so it "
                        f"would add no attention; set it to some of those")


def from_dict(raw: dict) -> Config:
    """Build and validate a Config from nested dicts (YAML content merged with overrides)."""
    if not isinstance(raw, dict):
        raise UserError("config: expected a mapping of sections (data, model, diffusion, train, sample)")
    for name, values in raw.items():
        if name not in SECTIONS:
            raise UserError(f"unknown config section '{name}' (known: {', '.join(SECTIONS)})")
        if values is not None and not isinstance(values, dict):
            raise UserError(f"config section '{name}': expected key: value pairs, got {values!r}")
    sections = {}
    for name in SECTIONS:
        values = dict(raw.get(name) or {})
        if name == "model" and values.get("preset") is not None:
            preset = values["preset"]
            if not isinstance(preset, str) or preset not in MODEL_PRESETS:
                raise UserError(f"config key model.preset: unknown preset {preset!r} "
                                f"(known: {', '.join(MODEL_PRESETS)})")
            values = {**MODEL_PRESETS[preset], **values}
        sections[name] = _section_from_dict(name, values)
    cfg = Config(**sections)
    _check_values(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4); values are parsed as YAML scalars/lists."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise UserError(f"cannot read override {text!r}: write section.key=value, e.g. train.lr=1e-4")
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def merge_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    merged = {k: dict(v or {}) for k, v in raw.items()}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name or "." in name:
            raise UserError(f"unknown config key {key} (write section.key with a section from: "
                            f"{', '.join(SECTIONS)})")
        merged.setdefault(section, {})[name] = value
    return merged


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return raw or {}


def read_run_config(path: str | Path) -> dict:
    """A run's config.yaml. Runs from before data.bit_depth existed read wide pixels as 8-bit when
    the largest value fit, else as 16-bit: without the key they keep that reading (resumes, sampling,
    balance, eval and downstream alike)."""
    raw = read_yaml(path)
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        raw["data"].setdefault("bit_depth", LEGACY_BIT_DEPTH)
    return raw


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    raw = read_yaml(path) if path is not None else {}
    return from_dict(merge_overrides(raw, overrides or {}))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# Keys that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_CHANGES = ("train.max_steps", "train.max_minutes", "train.log_every", "train.sample_every",
                     "train.checkpoint_every", "train.keep_last", "train.device", "train.out_dir", "train.max_nonfinite",
                     "train.eval_every", "train.eval_num", "train.eval_features", "train.tensorboard",
                     "train.grad_accum", "train.activation_checkpointing", "train.dist_timeout_minutes", "train.channels_last",
                     "model.compile", "data.stream", "data.workers", "sample.")


DATA_PATH_KEYS = ("data.path", "data.labels")  # recorded absolute, so any command finds them from anywhere


def absolute_path(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if isinstance(path, str) else path


def absolute_data_paths(flat: dict) -> dict:
    """A flattened config with its data paths made absolute (from the current folder)."""
    return {k: absolute_path(v) if k in DATA_PATH_KEYS else v for k, v in flat.items()}


def differing_keys(old: dict, new: dict) -> list[str]:
    """Keys whose values differ between two config dicts, ignoring those a resume may change. Data
    paths compare as absolute paths (runs before 2026-11-23 recorded them as given)."""
    a, b = absolute_data_paths(flatten(old)), absolute_data_paths(flatten(new))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_CHANGES)]
