"""`train.init_from`: start training from pretrained weights (a ddpmkit run or a diffusers model).

The network's architecture and the noise schedule come from the source, since the weights only
make sense with them; the data, image size, class count, dropout and training recipe come from
the config being trained. Weights (and the EMA, where the source has one) are loaded; the
optimizer and step start from zero.

- Another image size: attention stays at the same levels (attention_resolutions is rescaled), so
  every weight keeps its meaning; the UNet is convolutional and takes any size its levels divide.
- Another class count: the class embedding is new (initialised as a fresh model's) and reported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .checkpoint import load_into, read_checkpoint
from .config import Config, as_typed, updated
from .errors import UserError
from .run import RunDir

# Model keys the fine-tuning config decides; all others are the source's architecture.
OWN_KEYS = ("preset", "dropout", "compile", "compile_mode", "class_conditional", "num_classes",
            "in_channels", "augment_dim")
# The fine-tuning config's own conditioning: kept new where the source's is absent or shaped apart.
OWN_EMBEDDINGS = ("class_embedding.", "augment_embedding.")


class Source:
    """What init_from names, read lazily: its config first, weights only when a run starts."""

    def __init__(self, name: str, log=print):
        self.name, self.log = name, log
        path = Path(name).expanduser()
        if path.is_file() and RunDir(path.parent.parent).is_run():
            raise UserError(f"train.init_from {name} is a file of run {path.parent.parent}: give "
                            f"the run's folder (fine-tuning starts from its latest checkpoint)")
        if not path.exists() and name.count("/") != 1:  # not a hub id either
            raise UserError(f"train.init_from {name}: no such folder (give a ddpmkit run, a "
                            f"diffusers folder or a hub id like google/ddpm-cifar10-32)")
        self.is_run = RunDir(path).is_run()
        if self.is_run:
            self.path = path
            self.config = RunDir(path).config()
            self._net = None
        else:  # a diffusers folder or hub id: converted exactly, or refused
            from .diffusers_format import read_diffusers

            self.config, self._net, _ = read_diffusers(name, log=log)
            self.path = None

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
        """(model weights, EMA weights, description of what was loaded)."""
        if not self.is_run:
            sd = self._net.state_dict()
            return sd, sd, f"diffusers model {self.name}"
        entry = RunDir(self.path).select_checkpoint("latest")
        groups, meta = read_checkpoint(RunDir(self.path).checkpoint_file(entry["step"]),
                                       prefixes=("model", "ema"))
        return (groups["model"], groups["ema"],
                f"{self.path} step {meta['step']} ({entry['sha256'][:12]})")


def adopt_architecture(cfg: Config, source: Config, log=print) -> Config:
    """cfg with the source's model architecture and diffusion schedule, saying what changed."""
    values = {}
    for f in dataclasses.fields(source.model):
        value = getattr(source.model, f.name)
        if f.name == "attention_resolutions" and cfg.data.image_size != source.data.image_size:
            scale = cfg.data.image_size / source.data.image_size
            value = [round(r * scale) for r in value]  # attention at the same levels as the source
        if f.name not in OWN_KEYS and getattr(cfg.model, f.name) != value:
            values[f"model.{f.name}"] = value
    for f in dataclasses.fields(source.diffusion):
        if getattr(cfg.diffusion, f.name) != getattr(source.diffusion, f.name):
            values[f"diffusion.{f.name}"] = getattr(source.diffusion, f.name)
    if source.model.in_channels not in (None, cfg.model.in_channels):
        raise UserError(f"train.init_from: the source has {source.model.in_channels} channel(s) "
                        f"and the data {cfg.model.in_channels}: "
                        f"set data.channels={source.model.in_channels}")
    size, halvings = cfg.data.image_size, len(source.model.channel_mult) - 1
    if size % 2 ** halvings:
        raise UserError(f"train.init_from: data.image_size={size} does not halve {halvings} times "
                        f"as the source's UNet does: use a multiple of {2 ** halvings}")
    theirs, ours = source.data.class_names or [], cfg.data.class_names or []
    renamed = [f"{a} -> {b}" for a, b in zip(theirs, ours) if a != b]
    if len(theirs) == len(ours) and renamed:  # the embedding is kept by position
        log(f"init_from: note: each class starts from the source's class at its place, and "
            f"{len(renamed)} of their names differ ({', '.join(renamed[:3])}): if they are other "
            f"classes, fine-tuning must first unlearn the source's")
    if values:
        log(f"init_from: architecture and schedule taken from the source: "
            f"{', '.join(f'{k}={v}' for k, v in values.items())}")
    return updated(cfg, {**values, "model.preset": None})  # the architecture is spelled out now


def load_pretrained(model: torch.nn.Module, ema: torch.nn.Module, source: Source,
                    augment: list[str], log=print) -> str:
    """Copy the source's weights into model and EMA; a class or augmentation embedding the source
    lacks, or has in another shape, stays new, as does one for other operations than `augment`
    (train.augment: each column of the embedding means one operation's label)."""
    weights, ema_weights, what = source.weights()
    own = model.state_dict()
    other_ops = list(source.config.train.augment) != list(augment)
    fresh = [k for k in own if k.startswith(OWN_EMBEDDINGS)
             and (k not in weights or weights[k].shape != own[k].shape
                  or k.startswith("augment_embedding.") and other_ops)]
    dropped = [k for k in weights if k.startswith(OWN_EMBEDDINGS) and k not in own]
    keep = {k: v for k, v in own.items() if k in fresh}

    def pick(w):
        return {**{k: v for k, v in w.items() if k not in fresh and k not in dropped}, **keep}

    load_into(model, pick(weights), f"train.init_from {source.name}")
    load_into(ema, pick(ema_weights), f"train.init_from {source.name} (EMA)")
    if "class_embedding.weight" in fresh:
        theirs = weights.get("class_embedding.weight")
        log(f"init_from: new class embedding ({model.cfg.num_classes} classes); the source has "
            f"{'none' if theirs is None else theirs.shape[0]}")
    if "class_embedding.weight" in dropped:
        log("init_from: the source's class embedding is dropped (this model is unconditional)")
    if "augment_embedding.weight" in fresh + dropped:
        change = "new" if "augment_embedding.weight" in fresh else "dropped"
        log(f"init_from: augmentation embedding {change} (train.augment "
            f"{as_typed(list(augment))}, the source's {as_typed(source.config.train.augment)})")
    return what
