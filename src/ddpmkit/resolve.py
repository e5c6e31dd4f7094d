"""The training config resolved once, before anything runs.

config.py resolves defaults, the model preset, the YAML file and the overrides. What only the data
or a fine-tuning source can say is resolved here, into a new Config that nothing changes after:
absolute data paths, the bit depth wide pixels are read at (a resumed run's own), the channel
count, the class names and count of a class-conditional model, the augmentation label's size, and
train.init_from's architecture.
`ddpmkit info` and `train --max-batch` resolve the same fields without reading the whole dataset.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .augmentation import label_dim
from .config import Config, updated
from .data import (ImageData, class_order, data_channels, data_class_count, load_images,
                   read_labels_csv)
from .errors import UserError
from .pretrained import Source, adopt_architecture
from .run import RunDir
from .streaming import open_stream


@dataclass
class Prepared:
    cfg: Config  # resolved: read it, never change it
    # ImageData, or a streamed source (streaming.py): both have len(), labels, files, source_path,
    # skipped, channels, bit_depth and source; only ImageData holds its images
    data: object
    class_ids: torch.Tensor | None  # class index per image, for a class-conditional model
    source: Source | None  # train.init_from


def absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if isinstance(path, str) else path


def prepare_training(cfg: Config, fresh: bool, log=print) -> Prepared:
    """Read the data the config names and resolve what it decides; refusals come before any
    write."""
    if cfg.model.num_classes and not cfg.model.class_conditional:  # an embedding never trained
        raise UserError(f"config key model.num_classes: {cfg.model.num_classes} classes for a "
                        f"model that is not class-conditional: add model.class_conditional=true, "
                        f"or drop model.num_classes")
    if cfg.train.augment_p == 1:  # sampling asks for no augmentation: the network must see some
        raise UserError("config key train.augment_p=1: every training image would be augmented, "
                        "so the network never learns the un-augmented images it samples; give a "
                        "probability below 1 (EDM uses about 0.12)")
    # recorded absolute: sampling, eval --ref RUN and balance find the data from any folder
    values = {"data.path": absolute(cfg.data.path), "data.labels": absolute(cfg.data.labels)}
    run = RunDir(cfg.train.out_dir)
    recorded = not fresh and run.is_run() and run.config_path.is_file()  # a run to resume
    init_from = cfg.train.init_from
    if init_from and (Path(init_from).expanduser().exists()  # not a hub id, nor a folder gone since
                      or recorded and run.config().train.init_from == absolute(init_from)):
        values["train.init_from"] = absolute(init_from)
    if cfg.data.bit_depth is None and recorded:
        values["data.bit_depth"] = run.config().data.bit_depth  # a resumed run reads data as before
    cfg = updated(cfg, values)
    data = open_stream(cfg.data, log) if cfg.data.stream else load_images(cfg.data, log)
    if data.skipped:
        log(f"skipped {len(data.skipped)} unreadable image(s), e.g. {data.skipped[0][0]}: "
            f"{data.skipped[0][1]}")
    values = {"model.in_channels": _channels(cfg, data.channels),
              "model.augment_dim": label_dim(cfg.train.augment)}
    if cfg.data.bit_depth is None:  # in config.yaml: sampling, balance and eval read data alike
        values["data.bit_depth"] = data.bit_depth
    class_ids = None
    if cfg.model.class_conditional:
        class_ids, names = _class_ids(cfg, data)
        if cfg.sample.class_label not in (None, *names):  # every later `sample` would refuse it
            raise UserError(f"--class {cfg.sample.class_label}: not a class of the data "
                            f"({', '.join(names[:20])}; config key sample.class_label)")
        _describe_classes(names, data.labels, log)
        values.update({"data.class_names": names, "model.num_classes": len(names)})
    cfg = updated(cfg, values)
    if cfg.train.init_from and recorded and run.read_state()["checkpoints"]:
        # a resume: the weights come from the run's checkpoint, so the source (perhaps moved, or a
        # hub id offline) is not read; its architecture is the one the run recorded
        return Prepared(adopt_architecture(cfg, run.config(), log=lambda *_: None), data,
                        class_ids, None)
    source = Source(cfg.train.init_from, log) if cfg.train.init_from else None
    if source:
        cfg = adopt_architecture(cfg, source.config, log)
    return Prepared(cfg, data, class_ids, source)


NEEDS_LABELS = ("model.class_conditional=true needs labels: a CSV (data.labels), class subfolders "
                "(DATA/<class>/image.png), an .npz with *_labels or y, or the bundled digits")


def architecture(cfg: Config, log=print) -> tuple[Config, str]:
    """The config with the model's channel and class counts and train.init_from's architecture,
    as training will resolve them but without decoding the dataset (image headers, an .npy's first
    image, the labels), and where the channel count comes from. 3 is assumed only for a data.path
    that is not here."""
    source = Source(cfg.train.init_from, log) if cfg.train.init_from else None
    if cfg.model.in_channels or cfg.data.channels:
        channels, where = cfg.model.in_channels or cfg.data.channels, (
            "model.in_channels" if cfg.model.in_channels else "data.channels")
    elif source is not None:
        channels, where = source.config.model.in_channels, f"train.init_from {cfg.train.init_from}"
    elif cfg.data.path is None:
        channels, where = 1, "the bundled digits"
    elif not Path(cfg.data.path).expanduser().exists():
        channels, where = 3, (f"assumed: data.path {cfg.data.path} does not exist here "
                              f"(set data.channels=1 for grayscale data)")
    else:
        channels, where = data_channels(cfg.data), f"the data in {cfg.data.path}"
    values = {"model.in_channels": channels, "model.augment_dim": label_dim(cfg.train.augment)}
    if cfg.model.class_conditional and not cfg.model.num_classes and (
            cfg.data.path is None or Path(cfg.data.path).expanduser().exists()):
        values["model.num_classes"] = data_class_count(cfg.data)  # as training sets it
        if not values["model.num_classes"]:
            raise UserError(NEEDS_LABELS)
    cfg = updated(cfg, values)
    return (adopt_architecture(cfg, source.config, log) if source else cfg), where


def _channels(cfg: Config, found: int) -> int:
    if cfg.model.in_channels not in (None, found):
        fix = (f"set data.channels={cfg.model.in_channels} or drop"
               if cfg.model.in_channels in (1, 3) else "drop")
        raise UserError(f"model.in_channels={cfg.model.in_channels} but the data has {found} "
                        f"channel(s): {fix} model.in_channels")
    return found


def _describe_classes(names: list[str], labels: list[str], log) -> None:
    """Each class's image count, and what a user would want to know before training on them."""
    counts = Counter(labels)
    log("classes: " + ", ".join(f"{name} {counts[name]:,}" for name in names[:20])
        + (f" and {len(names) - 20} more" if len(names) > 20 else ""))
    absent = [c for c in names if not counts[c]]
    if absent:
        log(f"warning: data.class_names names {', '.join(absent[:5])}, which no training "
            f"image has: the model learns nothing of it here")
    folded = Counter(name.strip().casefold() for name in names)
    alike = [name for name in names if folded[name.strip().casefold()] > 1]
    if alike:  # "Melanoma" and "melanoma" would each be a class of half the images
        log(f"warning: labels {', '.join(alike[:6])} differ only in case or spaces, and each is a "
            f"class of its own: spell each class one way in the labels")


def _class_ids(cfg: Config, data: ImageData) -> tuple[torch.Tensor, list[str]]:
    """Class index per image for a class-conditional model, and the class names in index order."""
    if not data.labels or any(label is None for label in data.labels):
        files = [Path(f) for f in data.files or []]
        loose = [f for f in files if str(f.parent) == data.source_path]
        why = (f"; {loose[0]} is not in a class subfolder, so the folders do not name classes"
               if loose and len(loose) < len(files) else "")
        if cfg.data.labels:  # a CSV without the label column still selects images
            columns = read_labels_csv(Path(cfg.data.labels).expanduser(), cfg.data)[0]
            why = (f"; {cfg.data.labels} has no column '{cfg.data.label_column}': set "
                   f"data.label_column to its class column (columns: {', '.join(columns)})")
        raise UserError(NEEDS_LABELS + why)
    empty = [i for i, label in enumerate(data.labels) if not label.strip()]
    if empty:  # an empty class name would read as "no class" (unconditional) in manifests
        first = Path(data.files[empty[0]]).name if data.files is not None else f"image {empty[0]}"
        raise UserError(f"{len(empty)} image(s) have an empty label ({first} first): "
                        f"give each a class, or leave them out of the labels CSV")
    present = set(data.labels)
    names = cfg.data.class_names or class_order(present)
    unknown = sorted(present - set(names))
    if unknown:
        raise UserError(f"labels {', '.join(unknown[:5])} are not in data.class_names "
                        f"({', '.join(names[:10])})")
    if cfg.model.num_classes not in (0, len(names)):
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the labels name "
                        f"{len(names)} classes: drop model.num_classes (it is set from the labels)")
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[label] for label in data.labels]), list(names)
