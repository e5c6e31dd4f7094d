"""Configuration: five frozen dataclass sections, YAML in and out, dotted overrides, strict checks.

Resolution: dataclass defaults <- model preset <- YAML file <- `section.key=value` overrides (a
preset named by an override brings its architecture over the file's). A
Config is never changed once built: `updated(cfg, {"model.in_channels": 3})` returns a new one,
checked like the first. Each field states its rule (`positive`, a set of choices...) where it is
declared; unknown keys and wrong types are `UserError`s that name the key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .augmentation import OPERATIONS
from .errors import UserError, escape_controls, expect
from .limits import MAX_IMAGES_PER_JOB, MAX_SIDE
from .samplers import SAMPLERS, SPACINGS
from .schedule import PREDICTIONS, SCHEDULES

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")  # torch.compile's
EVAL_FEATURES = ("classifier", "efficientnet", "inception")
MAX_YAML_BYTES = 1 << 20  # a config is a page of text; anything larger is not one
MAX_YAML_NODES = 100_000  # a config holds a few hundred values; aliases can expand to billions
MAX_TIMESTEPS = 100_000  # far past any published schedule; its float64 tables stay small
# upper bounds far past any network or job that fits a machine, far below what a typo asks: a
# network is measured (built on the meta device) before its memory is checked, and that costs
# time and memory per block and per class
UPPER = {"data.image_size": MAX_SIDE, "model.base_channels": 1 << 20, "model.num_res_blocks": 64,
         "model.attention_head_dim": 1 << 20, "model.norm_groups": 1 << 20,
         "model.num_classes": 1_000_000, "train.grid_images": 4096,
         "train.eval_num": MAX_IMAGES_PER_JOB, "train.audit_num": MAX_IMAGES_PER_JOB}


def _key(default: Any = None, rule: str | tuple | None = None, factory=None):
    """A config field with its rule: "positive", "non_negative", "at_least_2", "fraction" ([0, 1)),
    "share" ([0, 1]), "seed" ([0, 2**63)), or a tuple of allowed values."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = None  # None: scikit-learn's bundled digits (1797 images, 8x8)
    image_size: int = _key(8, "positive")
    channels: Optional[int] = _key(None, (None, 1, 3))  # None: the data's own (gray stays gray)
    # integer pixels wider than 8 bits span 0..2**bit_depth-1; None: the smallest of 8, 10, 12, 14,
    # 16 bits that holds the data's largest value, recorded by a run when it starts
    bit_depth: Optional[int] = _key(None, (None, *range(8, 17)))
    hflip: bool = False
    labels: Optional[str] = None  # CSV with an image-name column and a label column
    image_column: str = "image"
    label_column: str = "label"
    filter_label: Optional[str] = None  # keep only rows whose label equals this
    split: str = "train"  # .npz {split}_images, IDX train or test, or a train/val/test subfolder
    class_names: Optional[list[str]] = None  # from the labels, for a class-conditional model
    on_error: str = _key("skip", ("skip", "fail"))  # unreadable images: skip (and report) or fail
    stream: bool = False  # read batches from disk (.npy memory-mapped, folders decoded lazily)
    workers: int = _key(4, "non_negative")  # with stream: DataLoader processes decoding ahead


@dataclass(frozen=True)
class ModelConfig:
    preset: Optional[str] = "small"  # "small", "ddpm-cifar10" or null; explicit keys override it
    in_channels: Optional[int] = _key(None, "positive")  # None: taken from the data
    base_channels: int = _key(32, "positive")
    channel_mult: list[int] = _key(factory=lambda: [1, 2])
    num_res_blocks: int = _key(2, "positive")
    attention_resolutions: list[int] = _key(factory=list)
    attention_head_dim: Optional[int] = _key(None, "positive")  # None: one head per attention layer
    dropout: float = _key(0.0, "fraction")
    norm_groups: int = _key(32, "positive")
    norm_eps: float = _key(1e-6, "positive")
    time_flip_sin_to_cos: bool = False  # embedding order [sin, cos] as in DDPM; diffusers' option
    time_freq_shift: float = 1.0  # DDPM divides frequencies by (half - 1)
    compile: bool = False  # torch.compile the network for training (CUDA; minutes of compilation)
    compile_mode: str = _key("default", COMPILE_MODES)
    class_conditional: bool = False  # learn p(x | class) from the data's labels
    num_classes: int = _key(0, "non_negative")  # the class embedding's size; set from the labels
    augment_dim: int = _key(0, "non_negative")  # augmentation label size; set from train.augment


@dataclass(frozen=True)
class DiffusionConfig:
    num_timesteps: int = _key(1000, "positive")
    schedule: str = _key("linear", SCHEDULES)
    # linear schedule only; None: Ho et al.'s 1e-4 and 0.02 scaled by 1000/T (Nichol & Dhariwal's
    # rule, the same at T=1000), so any T ends near pure noise; explicit values are taken as given
    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    prediction: str = _key("eps", PREDICTIONS)

    def __post_init__(self):
        T = self.num_timesteps
        if self.schedule == "linear" and isinstance(T, int) and not isinstance(T, bool) and T > 0:
            if self.beta_start is None:
                object.__setattr__(self, "beta_start", 1e-4 * 1000 / T)
            if self.beta_end is None:  # capped below 1, as the cosine schedule is
                object.__setattr__(self, "beta_end", min(0.02 * 1000 / T, 0.999))


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/default"
    batch_size: int = _key(128, "positive")  # the global batch per optimizer step
    grad_accum: int = _key(1, "positive")  # micro-batches per optimizer step
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory
    dist_timeout_minutes: float = _key(60.0, "positive")  # torchrun: how long a process waits
    lr: float = _key(1e-3, "non_negative")
    weight_decay: float = _key(0.0, "non_negative")
    warmup_steps: int = _key(200, "non_negative")
    grad_clip: float = _key(1.0, "non_negative")
    ema_decay: float = _key(0.995, "fraction")
    max_steps: int = _key(4000, "positive")
    max_minutes: float = _key(0.0, "non_negative")  # 0: no time budget
    precision: str = _key("auto", ("auto", "fp32", "bf16", "fp16"))  # auto: CUDA bf16, CPU fp32
    channels_last: bool = True  # CUDA: channels_last tensors (false: NCHW)
    seed: int = _key(0, "seed")
    device: str = "auto"
    log_every: int = _key(50, "positive")
    sample_every: int = _key(500, "positive")
    grid_images: int = _key(16, "positive")
    grid_steps: int = _key(50, "positive")
    checkpoint_every: int = _key(500, "positive")
    keep_last: int = _key(3, "positive")
    max_nonfinite: int = _key(20, "positive")  # stop after this many non-finite losses in a row
    eval_every: int = _key(0, "non_negative")  # 0: off; else eval checkpoints at multiples of this
    eval_num: int = _key(500, "at_least_2")  # samples per eval (dpmpp-2m, 20 steps, EMA weights)
    eval_features: str = _key("classifier", EVAL_FEATURES)  # classifier needs labels
    label_dropout: float = _key(0.1, "share")  # labels dropped: the unconditional model CFG needs
    # how often each class is drawn: image weight count(class)^-power; 0 the data's frequencies,
    # 1 every class equally often (class-conditional runs)
    class_balance: float = _key(0.0, "share")
    init_from: Optional[str] = None  # pretrained: a ddpmkit run, or a diffusers folder / hub id
    # non-leaky augmentation (augmentation.py): operations of hflip, vflip, rot90, translate,
    # each applied with probability augment_p; the network is told, and sampling asks for none
    augment: list[str] = _key(factory=list)
    augment_p: float = _key(0.0, "share")
    audit_every: int = _key(0, "non_negative")  # 0: off; else audit memorization at these steps
    audit_num: int = _key(256, "positive")  # samples per audit (fixed seed, dpmpp-2m 20 steps)
    tensorboard: bool = False  # also log scalars and sample grids to RUN/tensorboard


@dataclass(frozen=True)
class SampleConfig:
    out_dir: str = "samples"
    num: int = _key(64, "positive")
    sampler: str = _key("dpmpp-2m", tuple(SAMPLERS))
    steps: Optional[int] = _key(None, "positive")  # None: the sampler's default (all T for ddpm)
    eta: float = _key(0.0, "non_negative")
    spacing: str = _key("uniform", SPACINGS)
    variance: str = _key("small", ("small", "large"))  # ddpm: posterior (small) or beta (large)
    clip_x0: bool = True
    batch_size: int = _key(256, "positive")
    seed: int = _key(0, "seed")
    checkpoint: str = "latest"  # latest | best | a step number
    ema: bool = True
    size: Optional[int] = _key(None, "positive")  # bicubic upsampling of the output
    gif: bool = False
    device: str = "auto"
    precision: str = _key("auto", ("auto", "fp32", "bf16"))  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the network (pays off for large jobs on GPUs)
    compile_mode: str = _key("default", COMPILE_MODES)  # reduce-overhead adds CUDA graphs
    class_label: Optional[str] = None  # class-conditional models: the class (None: classes in turn)
    guidance: float = _key(1.0, "non_negative")  # 0 unconditional, 1 conditional, >1 stronger
    writers: int = _key(2, "positive")  # background threads encoding and writing PNGs


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig,
            "train": TrainConfig, "sample": SampleConfig}  # Config's fields, in its order

MODEL_PRESETS = {
    # the default: small enough to train on a CPU, for 8x8 to 32x32 data
    "small": dict(base_channels=32, channel_mult=[1, 2], num_res_blocks=2,
                  attention_resolutions=[], dropout=0.0),
    # Ho et al. 2020's CIFAR-10 network, block for block the layout of diffusers' UNet2DModel
    # for google/ddpm-cifar10-32.
    "ddpm-cifar10": dict(base_channels=128, channel_mult=[1, 2, 2, 2], num_res_blocks=2,
                         attention_resolutions=[16], dropout=0.1, attention_head_dim=None),
}


def _type_name(tp) -> str:
    return {int: "an integer", float: "a number", bool: "true or false",
            str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check `value` against the field type `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(key, value, next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is list:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, typing.get_args(tp)[0]) for i, v in enumerate(value)]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and number and float(value).is_integer():
        return int(value)
    if tp is str and isinstance(value, str) and not value.strip():
        raise UserError(f"config key {key}: empty; give a value, or null where the key has none")
    if tp is str and (number or isinstance(value, str)):
        return str(value)
    if tp is float and (number or isinstance(value, str)):  # YAML 1.1 reads "1e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
        else:
            if not math.isfinite(value):  # nan passes every < and > check, and trains nothing
                raise UserError(f"config key {key}: must be a finite number, got {value!r}")
            return value
    raise UserError(f"config key {key}: expected {_type_name(tp)}, got {value!r}")


def _check_rule(key: str, value: Any, rule) -> None:
    if isinstance(value, (int, float)) and value > UPPER.get(key, math.inf):
        raise UserError(f"config key {key}: {value:,} is more than ddpmkit's limit of "
                        f"{UPPER[key]:,}")
    if rule is None or value is None and not isinstance(rule, tuple):
        return
    if isinstance(rule, tuple):
        if value not in rule:
            shown = ", ".join("null" if a is None else str(a) for a in rule)
            raise UserError(f"config key {key}: {value!r} is not one of: {shown}")
    elif rule == "positive" and value <= 0:
        raise UserError(f"config key {key}: must be positive, got {value}")
    elif rule == "at_least_2" and value < 2:  # a covariance needs two feature vectors
        raise UserError(f"config key {key}: must be at least 2, got {value}")
    elif rule == "non_negative" and value < 0:
        raise UserError(f"config key {key}: must not be negative, got {value}")
    elif rule == "fraction" and not 0 <= value < 1:
        raise UserError(f"config key {key}: must be in [0, 1), got {value}")
    elif rule == "seed" and not 0 <= value < 2**63:
        raise UserError(f"config key {key}: a seed in [0, 2**63), got {value}")
    elif rule == "share" and not 0 <= value <= 1:
        what = {"train.label_dropout": "a share of labels", "train.augment_p": "a probability",
                "train.class_balance": "a power"}.get(key, "a share")
        raise UserError(f"config key {key}: {what}, in [0, 1], got {value}")


# keys that name classes: compared with the labels read from data, in one Unicode form
_CLASS_NAME_KEYS = ("data.filter_label", "data.class_names", "sample.class_label")


def class_name(text: str) -> str:
    """A class name in one Unicode form (NFC): a name typed or saved decomposed (as macOS writes
    accents) is the same class as its composed spelling."""
    return unicodedata.normalize("NFC", text)


def _section_from_dict(name: str, values: dict) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"unknown config key {name}.{key} (known keys in '{name}': "
                            f"{', '.join(sorted(fields))})")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
        if f"{name}.{key}" in _CLASS_NAME_KEYS and kwargs[key] is not None:
            # stripped, as labels are read
            kwargs[key] = (class_name(kwargs[key]).strip() if isinstance(kwargs[key], str)
                           else [class_name(v).strip() for v in kwargs[key]])
            twice = [v for v in set(kwargs[key]) if kwargs[key].count(v) > 1] if isinstance(
                kwargs[key], list) else []
            if twice:  # --class NAME would choose one of them
                raise UserError(f"config key {name}.{key}: {twice[0]!r} is named twice; name each "
                                f"class once")
        _check_rule(f"{name}.{key}", kwargs[key], fields[key].metadata.get("rule"))
    return cls(**kwargs)


def data_config(overrides: dict[str, Any]) -> DataConfig:
    """A data section on its own (an evaluation reference): checked as data, not against a model."""
    other = [k for k in overrides if not k.startswith("data.")]
    if other:
        raise UserError(f"only data.* keys describe a dataset here, got {other[0]}")
    return _section_from_dict("data", {k.removeprefix("data."): v for k, v in overrides.items()})


def sample_config(values: dict[str, Any]) -> SampleConfig:
    """A sample section on its own (the notebook API's keywords), checked key by key as the
    command line's are."""
    return _section_from_dict("sample", values)


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if not m.channel_mult or any(c <= 0 for c in m.channel_mult):
        raise UserError(f"config key model.channel_mult: needs positive entries, "
                        f"got {m.channel_mult}")
    widest = UPPER["model.base_channels"]
    if len(m.channel_mult) > 12 or m.base_channels * max(m.channel_mult) > widest:
        raise UserError(f"config key model.channel_mult: {m.channel_mult} makes more levels or "
                        f"wider ones than ddpmkit's limit (12 levels, {widest:,} channels)")
    if not m.time_freq_shift < m.base_channels // 2:  # the embedding divides by their difference
        raise UserError(f"config key model.time_freq_shift: {m.time_freq_shift:g} must be below "
                        f"half of model.base_channels ({m.base_channels // 2}); 1 is DDPM's, 0 "
                        f"diffusers' default")
    if m.base_channels % m.norm_groups:
        raise UserError(f"config key model.base_channels: {m.base_channels} is not divisible by "
                        f"model.norm_groups={m.norm_groups}")
    factor = 2 ** (len(m.channel_mult) - 1)
    if cfg.data.image_size % factor or cfg.data.image_size < 2 * factor:
        # below 2x2 at the bottom, GroupNorm would normalise single values
        raise UserError(f"config key data.image_size: {cfg.data.image_size} cannot pass through "
                        f"{len(m.channel_mult) - 1} halvings to at least 2x2 (model.channel_mult="
                        f"{m.channel_mult}); use a multiple of {factor}, at least {2 * factor}")
    levels = level_resolutions(cfg)
    if m.attention_head_dim is not None:  # attention levels, and the middle block at the last one
        widths = sorted({m.base_channels * c
                         for i, (c, level) in enumerate(zip(m.channel_mult, levels))
                         if level in m.attention_resolutions or i == len(levels) - 1})
        # a layer of C channels has max(1, C // head_dim) heads (like diffusers), which must split C
        bad = [w for w in widths if w % max(1, w // m.attention_head_dim)]
        if bad:
            raise UserError(f"config key model.attention_head_dim: {m.attention_head_dim} makes "
                            f"{bad[0] // m.attention_head_dim} heads of the {bad[0]} channels "
                            f"of a level, which do not split evenly; use a divisor of {bad[0]}")
    unmatched = [r for r in m.attention_resolutions if r not in levels]
    if unmatched:
        preset = (m.preset
                  and MODEL_PRESETS[m.preset]["attention_resolutions"] == m.attention_resolutions)
        raise UserError(
            f"config key model.attention_resolutions={m.attention_resolutions}"
            f"{f', from model.preset={m.preset}' if preset else ''}: no level of this model is "
            f"{unmatched[0]}x{unmatched[0]} (data.image_size={cfg.data.image_size}, "
            f"model.channel_mult={m.channel_mult}: levels {', '.join(map(str, levels))}), "
            f"so it would add no attention; set it to some of those")


def _check_values(cfg: Config) -> None:
    _check_model(cfg)
    d = cfg.diffusion
    if d.schedule == "linear" and not 0 < d.beta_start < d.beta_end < 1:
        raise UserError("config keys diffusion.beta_start/beta_end: "
                        "need 0 < beta_start < beta_end < 1")
    if d.schedule != "linear" and (d.beta_start, d.beta_end) != (None, None):
        raise UserError(f"config keys diffusion.beta_start/beta_end shape the linear schedule; "
                        f"the {d.schedule} schedule has none: drop them")
    if d.num_timesteps < 2:  # one step cannot go from noise to data: its beta is beta_start
        raise UserError(f"config key diffusion.num_timesteps: {d.num_timesteps} is too few; "
                        f"use at least 2 (1000 is DDPM's)")
    if d.num_timesteps > MAX_TIMESTEPS:
        raise UserError(f"config key diffusion.num_timesteps: {d.num_timesteps:,} is too many; "
                        f"use at most {MAX_TIMESTEPS:,} (1000 is DDPM's)")
    if cfg.sample.class_label is not None and not cfg.model.class_conditional:
        raise UserError(f"--class {cfg.sample.class_label}: the model is not class-conditional, "
                        f"so it has no classes (config key sample.class_label); drop it, or "
                        f"train with model.class_conditional=true")
    if cfg.sample.steps is not None and cfg.sample.steps > d.num_timesteps:
        raise UserError(f"config key sample.steps: {cfg.sample.steps} is more than "
                        f"diffusion.num_timesteps={d.num_timesteps}")
    t = cfg.train
    if t.class_balance and not cfg.model.class_conditional:
        raise UserError(f"config key train.class_balance={t.class_balance} draws classes by their "
                        f"labels: set model.class_conditional=true, or drop it")
    unknown = [op for op in t.augment if op not in OPERATIONS]
    if unknown or len(set(t.augment)) != len(t.augment):
        raise UserError(f"config key train.augment: {as_typed(t.augment)} is not a list of "
                        f"distinct operations from: {', '.join(OPERATIONS)}")
    if bool(t.augment) != (t.augment_p > 0):
        raise UserError(f"config keys train.augment={as_typed(t.augment)} and "
                        f"train.augment_p={t.augment_p}: set both (operations and a probability "
                        f"above 0) or neither")


def level_resolutions(cfg: Config) -> list[int]:
    """The side of the feature maps at each level of the UNet, from the top."""
    return [cfg.data.image_size // 2**i for i in range(len(cfg.model.channel_mult))]


def _check_sections(raw) -> None:
    """A config's top level: a mapping of known sections, each a mapping (or empty)."""
    if not isinstance(raw, dict):
        raise UserError("config: expected a mapping of sections "
                        "(data, model, diffusion, train, sample)")
    for name, values in raw.items():
        if name not in SECTIONS:
            raise UserError(f"unknown config section '{name}' (known: {', '.join(SECTIONS)})")
        if values is not None and not isinstance(values, dict):
            raise UserError(f"config section '{name}': expected key: value pairs, got "
                            f"{str(values)[:80]!r}")


def from_dict(raw: dict) -> Config:
    """Build and check a Config from nested dicts (YAML content merged with overrides)."""
    _check_sections(raw)
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


def updated(cfg: Config, values: dict[str, Any]) -> Config:
    """A new Config: `cfg` with these `section.key` values, checked as a whole again."""
    return from_dict(merge_overrides(cfg.to_dict(), values))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4); values are parsed as YAML scalars/lists, except that
    a text key takes the text as typed (sample.checkpoint=0010, train.out_dir=runs/exp #3) and a
    list of text keeps each item's text; null, ~ or nothing is None."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise UserError(f"cannot read override {text!r}: write section.key=value, "
                        f"e.g. train.lr=1e-4")
    kind = _text_kind(key)
    if value in ("", "null", "~") and kind is not None:
        return key, None
    if kind == "text" and not (len(value) > 1 and value[0] == value[-1] and value[0] in "'\""):
        return key, value
    try:
        return key, safe_yaml(value, f"override {key}", _TextLoader if kind else _UniqueKeyLoader)
    except UserError:
        return key, value


def _text_kind(key: str) -> str | None:
    """'text' for a key whose value is text, 'texts' for a list of text, else None."""
    section, _, name = key.partition(".")
    tp = typing.get_type_hints(SECTIONS[section]).get(name) if section in SECTIONS else None
    if typing.get_origin(tp) is typing.Union:  # Optional[X]
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is str:
        return "text"
    return "texts" if typing.get_origin(tp) is list and typing.get_args(tp)[0] is str else None


def merge_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    _check_sections(raw)
    merged = {k: dict(v or {}) for k, v in raw.items()}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name or "." in name:
            raise UserError(f"unknown config key {key} (write section.key with a section from: "
                            f"{', '.join(SECTIONS)})")
        merged.setdefault(section, {})[name] = value
    preset = overrides.get("model.preset")
    if isinstance(preset, str) and preset in MODEL_PRESETS:  # a preset named here beats the file's
        merged["model"] |= {k: v for k, v in MODEL_PRESETS[preset].items()
                            if f"model.{k}" not in overrides}
    return merged


class _RefuseRepeatedKeys:
    """A key given twice in one mapping is refused: YAML would keep the last silently, so half of
    a duplicated section was never used (a merge key's keys may still be overridden)."""

    def construct_mapping(self, node, deep=False):
        named = [k for k, _ in node.value
                 if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge"]
        keys = [k.value for k in named]
        repeated = next((i for i, k in enumerate(keys) if k in keys[:i]), None)
        if repeated is not None:  # located at its second appearance
            raise yaml.constructor.ConstructorError(None, None, f"key {keys[repeated]!r} is given "
                                                    f"twice in one mapping",
                                                    named[repeated].start_mark)
        return super().construct_mapping(node, deep)


class _UniqueKeyLoader(_RefuseRepeatedKeys, yaml.SafeLoader):
    """PyYAML's safe loader: plain data, no Python objects."""


class _TextLoader(_RefuseRepeatedKeys, yaml.BaseLoader):
    """Every scalar read as the text typed ([01, 02] are '01' and '02', not 1 and 2)."""


def safe_yaml(text: str, what: str, loader: type = _UniqueKeyLoader) -> Any:
    """YAML text -> plain data, refused when its aliases expand it past MAX_YAML_NODES: a few
    hundred bytes of nested aliases can name billions."""
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:  # where, and what (a tab, an unclosed quote...)
        at = exc.problem_mark
        where = f" (line {at.line + 1}, column {at.column + 1})" if at else ""
        said = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise UserError(f"{what} is not valid YAML: {escape_controls(said)[:200]}{where}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise UserError(f"{what} is not valid YAML: {str(exc).splitlines()[0][:200]}") from None
    stack, seen = [data], 0
    while stack:  # shared (aliased) nodes are walked again each time, as a reader would
        node, seen = stack.pop(), seen + 1
        if seen > MAX_YAML_NODES:
            raise UserError(f"{what} expands to more than {MAX_YAML_NODES:,} values (YAML aliases "
                            f"repeating each other): refused")
        if isinstance(node, (dict, list)):
            stack.extend(node.values() if isinstance(node, dict) else node)
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir() and (path / "config.yaml").is_file():
        raise UserError(f"{path} is a run, not a config file: give {path / 'config.yaml'} to "
                        f"train another like it, or --out {path} to resume it")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a config file: to train on its images, "
                        f"write --data {path}")
    if not path.is_file():
        raise UserError(f"config file not found: {path}" if not path.exists() else
                        f"{path} is not a regular file (a pipe or device): give a YAML config")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"config file {path} is {path.stat().st_size:,} bytes: a config is at most "
                        f"{MAX_YAML_BYTES:,}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text: save it as UTF-8") from None
    return safe_yaml(text, f"config file {path}") or {}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    expect(overrides or {}, dict, "load_config()'s overrides are a dict of 'section.key': value")
    raw = read_yaml(path) if path is not None else {}
    return from_dict(merge_overrides(raw, overrides or {}))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None,
                          allow_unicode=True)


def as_typed(value: Any) -> str:
    """A config value as a user types it in an override: `false`, `null`, `[1, 2]`."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("...\n").strip()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
