"""Reading training images from wherever users keep them, into one uint8 N x C x H x W tensor.

Sources: scikit-learn's digits (the bundled default), a folder of images (recursive), optionally
filtered or labelled by a CSV, .npy/.npz arrays, and MNIST-style IDX files. Every image is resized
(shorter side) and center-cropped to `image_size`; grayscale stays grayscale unless
`data.channels` says otherwise. Scaling to [-1, 1] and flips happen per batch (`batch_to_model`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import math
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import RECORD_NAME, read_json
from .config import DataConfig, class_name
from .errors import UserError, escape_controls
from .limits import check_memory
from .pixels import (GRAY_MODES, IMAGE_SUFFIXES, UNREADABLE, array_to_uint8_nchw, as_nchw,
                     open_image, read_image_files, scales_note, value_scale)


@dataclass
class ImageData:
    images: torch.Tensor  # uint8, N x C x H x W
    source: str  # what was read, for logs and the run record
    labels: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) per unreadable image
    files: list[str] | None = None  # each image's file, for folders
    source_path: str = ""  # the file or folder read (arrays: with their key), for manifests
    bit_depth: int | None = None  # the depth wide integer pixels were read at (None: none were)
    index: list[int] | None = None  # each image's place in its array, once data.filter_label chose
    upsampled: int = 0  # images smaller than data.image_size, enlarged to it

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    @cached_property
    def digests(self) -> list[str]:
        """Each image's sha256, hashed once for every check that needs it."""
        return image_digests(self.images)

    def origins(self) -> list[str]:
        """Where each image came from: its file, or `array#index` for arrays and the digits."""
        if self.files is not None:
            return [str(Path(f).resolve()) for f in self.files]
        return [f"{self.source_path}#{i}" for i in self.index or range(len(self))]


def load_images(cfg: DataConfig, log=print) -> ImageData:
    if cfg.path is None:
        if cfg.split != "train":
            raise UserError(f"data.split={cfg.split}: the bundled digits (no data.path) have no "
                            f"splits: set data.path to data with a {cfg.split} split")
        data = _load_digits()
    else:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise UserError(f"data path not found: {path}")
        refuse_labels_off_folder(path, cfg)
        if is_idx_data(path):
            data = _load_idx(path, cfg.split, cfg.bit_depth)
        elif path.is_dir():
            data = _load_folder(split_folder(path, cfg), cfg, log)
        elif path.suffix.lower() in (".npy", ".npz"):
            data = _load_array_file(path, cfg.split, cfg.bit_depth)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise UserError(f"data path {path} is a single image: point data.path at its folder")
        elif path.suffix.lower() == ".csv":
            raise UserError(f"data path {path} is a CSV, not images: a labels CSV is given as "
                            f"data.labels={path}, with data.path the folder of its images")
        else:
            raise UserError(f"data path {path}: not a folder, .npy/.npz or IDX file")
    refuse_control_characters(data.labels or (), data.source_path or "the data")
    if cfg.filter_label is not None:
        data = keep_label(data, cfg.filter_label)
    if min(data.images.shape[-2:]) < cfg.image_size:  # arrays: one size (folders count their own)
        data.upsampled = len(data)
    images = set_channels(data.images, cfg.channels)
    data.images = resize_center_crop(images, cfg.image_size)
    return data


def refuse_control_characters(labels, where: str) -> None:
    """A class name is printed in logs and written into reports: one holding control characters
    could drive the terminal, so it is refused."""
    odd = next((name for name in set(labels) if escape_controls(name) != name), None)
    if odd is not None:
        raise UserError(f"{where} has a class named '{escape_controls(odd)}', which holds control "
                        f"characters: rename the class")


def refuse_non_utf8_names(files: list[Path]) -> None:
    """Manifests and reports name the files in UTF-8 text: a path holding bytes that are not UTF-8
    (which Python reads as lone surrogates) is refused."""
    odd = next((f for f in files if any("\ud800" <= c <= "\udfff" for c in str(f))), None)
    if odd is not None:
        raise UserError(f"{escape_controls(odd)}: this path is not valid UTF-8: rename it")


def keep_label(data: ImageData, label: str) -> ImageData:
    """data.filter_label: only one class's images, each still named by where it came from (a
    labels CSV is filtered as it is read; arrays, IDX files and class folders here)."""
    keep = labelled(data.labels, label, data.source_path)
    index = data.index or range(len(data))
    return replace(data, images=data.images[keep], labels=[data.labels[i] for i in keep],
                   source=data.source if len(keep) == len(data) else  # a CSV chose them already
                   f"{len(keep)} images labelled {label} of {data.source}",
                   files=None if data.files is None else [data.files[i] for i in keep],
                   index=[index[i] for i in keep], upsampled=min(data.upsampled, len(keep)))


def labelled(labels: list[str] | None, label: str, where: str) -> list[int]:
    """The positions of data.filter_label's images among `labels` (those of `where`)."""
    if labels is None:
        raise UserError(f"data.filter_label={label}: {where} has no labels to choose from")
    keep = [i for i, name in enumerate(labels) if name == label]
    if not keep:
        raise UserError(f"data.filter_label={label}: no image in {where} has it "
                        f"(labels present: {', '.join(class_order(labels)[:10])})")
    return keep


def refuse_labels_off_folder(path: Path, cfg: DataConfig) -> None:
    """data.labels (a CSV) names images in a folder: for arrays and IDX files it would be
    ignored."""
    if cfg.labels is not None and (not path.is_dir() or is_idx_data(path)):
        raise UserError(f"data.labels={cfg.labels} names images in a folder, and {path} is not "
                        f"a folder of images: drop data.labels (an .npz takes labels from its "
                        f"*_labels or y arrays, IDX from its labels file)")


def class_order(labels) -> list[str]:
    """The distinct labels in a stable order: integers numerically (2 before 10), then names."""
    def key(c: str):
        numeric = re.fullmatch(r"-?[0-9]+", c) is not None  # not "--5" or "²", which int() refuses
        return (not numeric, int(c) if numeric else 0, c)

    return sorted(set(labels), key=key)


def image_digests(images: torch.Tensor) -> list[str]:
    """sha256 of each uint8 image's bytes: identity at a given size, for the leakage guard."""
    return [hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images]


def labelling_digest(digests: list[str], labels: list[str]) -> str:
    """sha256 of which image (by its digest) carries which label, whatever their order: the same
    images relabelled with the counts per class unchanged get another."""
    pairs = sorted(f"{d} {label}" for d, label in zip(digests, labels))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()


def batch_to_model(images_u8: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 N x C x H x W -> float in [-1, 1]; images where the bool mask `flip` is set are
    mirrored."""
    x = images_u8.float() / 127.5 - 1.0
    if flip is not None:
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x


# ---------------------------------------------------------------------------------------------
# geometry and channels


def in_chunks(fn, images: torch.Tensor, out_numel: int = 0) -> torch.Tensor:
    """fn over the images a chunk at a time: its float intermediates stay small (64 MB) whatever
    the dataset's size, sized by the larger of an input image and an output one (`out_numel`
    values: an upsampling makes more than it takes)."""
    step = max(1, 2**24 // max(1, images[0].numel(), out_numel))
    return (images if len(images) == 0
            else torch.cat([fn(images[i:i + step]) for i in range(0, len(images), step)]))


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size` (antialiased bicubic), then center-crop to
    size x size."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images.contiguous()
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2

    def resize(part):
        x = F.interpolate(part.float(), size=(nh, nw), mode="bicubic", antialias=True,
                          align_corners=False)
        return x[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)

    return in_chunks(resize, images, c * nh * nw).contiguous()


def set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma, as PIL's "L"
    return in_chunks(lambda part: (part.float() * weights).sum(1, keepdim=True).round()
                     .clamp(0, 255).to(torch.uint8), images)


# ---------------------------------------------------------------------------------------------
# bundled default


def _load_digits() -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    arr = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    return ImageData(torch.from_numpy(arr)[:, None], "scikit-learn digits (1797 images, 8x8)",
                     labels=[str(int(v)) for v in digits.target],
                     source_path="sklearn.datasets.load_digits")


# ---------------------------------------------------------------------------------------------
# folders of images


VALIDATION_FOLDERS = ("val", "valid", "validate", "validation", "dev")  # as published sets name it
SPLIT_FOLDERS = ("train", "training", *VALIDATION_FOLDERS, "test", "testing")
# names of what an editor, a notebook or an archive left beside the data: never images or classes
HIDDEN = (".", "__")  # .ipynb_checkpoints, macOS's ._x.png, __MACOSX


def _split_subfolders(root: Path) -> list[Path]:
    """The split folders of a folder whose subfolders are named as splits and that has no image
    beside them (a README or LICENSE may be); [] for any other folder. Folders ddpmkit wrote
    there (samples, a run) and folders without images are no classes and no splits: ignored."""
    entries = [p for p in root.iterdir() if not p.name.startswith(HIDDEN)]
    subdirs = [p for p in entries if p.is_dir() and not _generated_folders([(p, os.listdir(p))])
               and _holds_images(p)]
    loose_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    splits = [p for p in subdirs if p.name.lower() in SPLIT_FOLDERS]
    others = sorted(p.name for p in subdirs if p not in splits)
    # train beside another split: a lone class named "train" (CIFAR-100 has one) is a class
    if (others or loose_images) and len(splits) > 1 and any(
            p.name.lower() in ("train", "training") for p in splits):
        beside = others[:3] if others else sorted(p.name for p in loose_images)[:3]
        raise UserError(f"{root} holds split folders ({', '.join(sorted(p.name for p in splits))}) "
                        f"and, beside them, {'folders of images' if others else 'images'} "
                        f"({', '.join(beside)}): move those out, so the splits are not read as "
                        f"one set")
    return subdirs if subdirs and not loose_images and not others else []


def _holds_images(folder: Path) -> bool:
    return any(not n.startswith(HIDDEN) and Path(n).suffix.lower() in IMAGE_SUFFIXES
               for _, names in _walk(folder) for n in names)


def data_channels(data: DataConfig) -> int:
    """The channel count training will find in existing data, without decoding a dataset: a folder's
    image headers (1 if every readable one is gray), the first image of a memory-mapped .npy. An
    .npz or IDX file is loaded: they hold arrays small enough for that."""
    path = Path(data.path).expanduser()
    if path.is_dir() and not is_idx_data(path):
        files, _ = list_image_files(split_folder(path, data), data, log=lambda *_: None)
        for file in files:
            try:
                with open_image(file) as im:
                    if im.mode not in GRAY_MODES:
                        return 3
            except UNREADABLE:
                continue  # skipped by training too (or refused, with data.on_error=fail)
        return 1
    if path.suffix.lower() == ".npy":
        refuse_misnamed_array(path)
        try:
            first = np.load(path, mmap_mode="r", allow_pickle=False)[:1]
        except (ValueError, OSError, IndexError):  # not an array file, or a 0-d array
            return load_images(data).channels  # which names what is wrong with it
        return as_nchw(first, str(path)).shape[1]  # its layout alone: one image sets no scale
    return load_images(data).channels


def data_class_count(data: DataConfig) -> int:
    """How many classes training will find, without decoding a folder's images: a CSV's or the
    class subfolders' labels, an .npz's or IDX file's labels (loaded), the digits' ten (0: none)."""
    if data.class_names:
        return len(data.class_names)
    path = Path(data.path).expanduser() if data.path is not None else None
    if path is not None and path.is_dir() and not is_idx_data(path):
        labels = list_image_files(split_folder(path, data), data, log=lambda *_: None)[1]
        if data.filter_label is not None:  # one class left (or the refusal training would give)
            labelled(labels, data.filter_label, str(path))
            return 1
    elif path is not None and path.suffix.lower() == ".npy":  # holds no labels
        return 0
    else:
        labels = load_images(data, log=lambda *_: None).labels
    return len({label for label in labels or [] if label.strip()})  # training refuses an empty one


def has_named_splits(path: str | Path) -> bool:
    """Whether data.split chooses among parts of `path` (an .npz, an IDX folder, a train/val/test
    folder) rather than `path` being one split itself (a plain folder, an .npy, one IDX file)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".npz" and not path.is_dir():
        splits = npz_splits(path)
        return splits is None or bool(splits)  # an unreadable file: the loader says what is wrong
    return bool(named_splits(path))


def named_splits(path: str | Path) -> set[str] | None:
    """The splits data.split chooses among in `path`, or None where it is one split itself or
    cannot be read. Folder names are lower case, as data.split matches them."""
    path = Path(path).expanduser()
    if path.is_dir() and is_idx_data(path):
        names = [p.name for p in _idx_files(path)]
        held = {s for s in _IDX_SPLIT_WORDS if any(_idx_file_of_split(n, s) for n in names)}
        return held or {"train"}  # one unnamed file is the train split
    if path.is_dir():
        return {p.name.lower() for p in _split_subfolders(path)} or None
    return npz_splits(path) if path.suffix.lower() == ".npz" else None


def npz_splits(path: Path) -> set[str] | None:
    """The splits an .npz holds ({split}_images), or None where it cannot be read."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    return {n.removesuffix("_images.npy") for n in names if n.endswith("_images.npy")}


def split_folder(root: Path, cfg: DataConfig) -> Path:
    """A folder split into train/, val/, test/ (every subfolder a split's name, no image beside
    them; the usual layout of published datasets) is read one split at a time: data.split picks it,
    so the splits are never taken for classes. Any other folder is one split, the default one."""
    subdirs = _split_subfolders(root) if cfg.labels is None else []
    if subdirs:
        chosen = [p for p in subdirs if p.name.lower() == cfg.split.lower()]
        if not chosen:
            raise UserError(f"{root} is split into {', '.join(sorted(p.name for p in subdirs))} "
                            f"and has no '{cfg.split}' split: set data.split to one of them")
        return chosen[0]
    if cfg.split != "train":
        why, fix = (("a CSV, data.labels, names its images", f"give the CSV naming the "
                     f"{cfg.split} images as data.labels instead") if cfg.labels is not None
                    else ("no train/val/test folders",
                          f"point data.path at the {cfg.split} images instead"))
        raise UserError(f"data.split={cfg.split}: {root} has no splits ({why}): {fix}")
    return root


def list_image_files(root: Path, cfg: DataConfig, log=print) -> tuple[list[Path], list[str] | None]:
    """The folder's images (recursive, sorted), selected and labelled by the CSV if one is given.
    Folders ddpmkit wrote (generated images, a run's grids) are left out, and said so."""
    files, ours = _listed(root)
    if ours:
        kept = _not_under(files, ours)
        folders = ", ".join(map(str, sorted(ours)))
        log(f"left out {len(files) - len(kept)} image(s) under {folders}: ddpmkit generated them "
            f"(its {RECORD_NAME} or a run's meta.json is there)")
        files = kept
    labels = None
    if cfg.labels is not None:
        files, labels = _select_by_csv(root, files, cfg, log)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    refuse_non_utf8_names(files)
    if labels is None:
        labels = _class_folder_labels(root, files)
    return files, labels


def _listed(root: Path) -> tuple[list[Path], set[Path]]:
    """The image files under root (sorted) and the folders among them that ddpmkit wrote."""
    listing = list(_walk(root))
    files = sorted(folder / n for folder, names in listing for n in names
                   if not n.startswith(HIDDEN) and Path(n).suffix.lower() in IMAGE_SUFFIXES
                   and (folder / n).is_file())
    return files, _generated_folders(listing)


def _not_under(files: list[Path], folders: set[Path]) -> list[Path]:
    return [f for f in files if not any(folder in f.parents for folder in folders)]


def users_images(root: Path) -> list[Path]:
    """The image files under root that reading it as data would take: none ddpmkit wrote."""
    return _not_under(*_listed(root))


def _walk(root: Path):
    """(folder, its file names) for `root` and every folder under it but hidden ones, following
    linked folders (a class folder may be a link), each real folder once, so a link loop ends."""
    seen = set()
    for top, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        folders[:] = [] if real in seen else sorted(f for f in folders if not f.startswith(HIDDEN))
        if real not in seen:
            seen.add(real)
            yield Path(top), names


def _generated_folders(listing: list[tuple[Path, list[str]]]) -> set[Path]:
    """Folders of a `_walk` that ddpmkit wrote: an output folder's record, a run's meta.json."""
    ours = {folder for folder, names in listing if RECORD_NAME in names}
    for meta in (folder / "meta.json" for folder, names in listing if "meta.json" in names):
        try:
            if read_json(meta).get("format", "").startswith("ddpmkit-run/"):
                ours.add(meta.parent)
        except (OSError, ValueError, AttributeError):
            continue  # someone's meta.json
    return ours


def _class_folder_labels(root: Path, files: list[Path]) -> list[str] | None:
    """root/<class>/image.png: the first folder level names the class, when every image has one
    and there are at least two (a single subfolder is just where the images are)."""
    parts = [f.relative_to(root).parts for f in files]
    if any(len(p) < 2 for p in parts):
        return None
    labels = [class_name(p[0]) for p in parts]
    return labels if len(set(labels)) > 1 else None


def _load_folder(root: Path, cfg: DataConfig, log) -> ImageData:
    files, labels = list_image_files(root, cfg, log)
    smaller = []  # images below data.image_size, enlarged to it

    def fit(image: torch.Tensor) -> torch.Tensor:
        smaller.append(min(image.shape[-2:]) < cfg.image_size)
        return resize_center_crop(image[None], cfg.image_size)[0]

    read = read_image_files(files, f"the images under {root}", bit_depth=cfg.bit_depth,
                            channels=cfg.channels, on_error=cfg.on_error,
                            hint=" (set data.on_error=skip to skip such files)", fit=fit)
    kept = set(read.files)
    if labels:
        classes = set(labels)
        labels = [label for path, label in zip(files, labels) if Path(path) in kept]
        lost = sorted(classes - set(labels))
        if lost:
            log(f"warning: every image of class {', '.join(lost[:5])} was unreadable and skipped: "
                f"the data has no such class now")
    images = torch.stack(read.images)
    desc = (f"{len(images)} images from {root}"
            + (f" (labelled by {cfg.labels})" if cfg.labels else "")
            + (f" ({len(read.skipped)} skipped)" if read.skipped else ""))
    return ImageData(images, desc + read.note, labels=labels, skipped=read.skipped,
                     files=[str(f) for f in read.files], source_path=str(root),
                     bit_depth=read.bit_depth, upsampled=sum(smaller))


def read_labels_csv(csv_path: Path, cfg: DataConfig) -> tuple[list[str], list[dict]]:
    """A labels CSV's column names (stripped) and rows, with the image column checked."""
    if not csv_path.is_file():
        raise UserError(f"labels CSV not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]  # "file, label"
            columns = reader.fieldnames
            rows = list(reader)
    except UnicodeDecodeError:
        raise UserError(f"labels CSV {csv_path} is not UTF-8 text: save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise UserError(f"labels CSV {csv_path} cannot be read as CSV: {exc}") from None
    twice = [c for c in (cfg.image_column, cfg.label_column) if columns.count(c) > 1]
    if twice:  # csv.DictReader would keep the last column of the name, silently
        raise UserError(f"labels CSV {csv_path} names column '{twice[0]}' twice: rename or "
                        f"remove one")
    if cfg.image_column not in columns:
        raise UserError(f"labels CSV {csv_path} has no column '{cfg.image_column}' "
                        f"(columns: {', '.join(columns)}); set data.image_column")
    if cfg.filter_label is not None and cfg.label_column not in columns:
        raise UserError(f"labels CSV {csv_path} has no column '{cfg.label_column}' to filter on "
                        f"(columns: {', '.join(columns)}); set data.label_column")
    return columns, rows


class _FileNames:
    """A CSV's image names against the folder's files: a path under the folder (absolute too, if it
    is inside), with or without its suffix, or a bare file name that one file has. Names compare in
    one Unicode form, as class names do: a sheet typed on one system names files copied from
    another."""

    def __init__(self, root: Path, files: list[Path], csv_path: Path):
        self.root, self.csv_path = root, csv_path
        self.by_rel = {class_name(p.relative_to(root).as_posix()): p for p in files}
        self.others: dict[str, list[Path]] = {}
        for rel, p in self.by_rel.items():
            for key in {str(PurePosixPath(rel).with_suffix("")), class_name(p.stem),
                        class_name(p.name)}:
                self.others.setdefault(key, []).append(p)

    def match(self, name: str) -> Path | None:
        pure = PurePosixPath(class_name(name.replace("\\", "/")))
        if pure.is_absolute() and ".." not in pure.parts:
            for base in {class_name(root.as_posix()) for root in (self.root, self.root.resolve())}:
                if pure.is_relative_to(base):
                    pure = pure.relative_to(base)
        if pure.is_absolute() or ".." in pure.parts:
            raise UserError(f"labels CSV {self.csv_path}: "
                            f"'{name}' points outside the data folder {self.root}")
        found = self.by_rel.get(pure.as_posix())
        candidates = sorted(set(self.others.get(pure.as_posix(), [])))
        if found is None and len(candidates) > 1:
            shown = ", ".join(str(p.relative_to(self.root)) for p in candidates[:3])
            raise UserError(f"labels CSV {self.csv_path}: '{name}' could be any of {shown}: "
                            f"name it by its path under {self.root}")
        return found or (candidates[0] if candidates else None)


def _select_by_csv(root: Path, files: list[Path], cfg: DataConfig,
                   log=print) -> tuple[list[Path], list[str] | None]:
    csv_path = Path(cfg.labels).expanduser()
    columns, rows = read_labels_csv(csv_path, cfg)
    has_labels = cfg.label_column in columns
    names = _FileNames(root, files, csv_path)
    chosen, labels, missing, seen = [], [], [], set()
    for number, row in enumerate(rows, start=1):
        extra, short = row.get(None) or [], list(row.values()).count(None)
        if extra or short:  # a value with an unquoted comma, or a value missing: never guessed
            raise UserError(f"labels CSV {csv_path}: data row {number} has "
                            f"{len(columns) + len(extra) - short} values where the header names "
                            f"{len(columns)} columns: quote a value that holds a comma")
        name = (row.get(cfg.image_column) or "").strip()
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # a blank row, as spreadsheets write them
        if not name:
            raise UserError(f"labels CSV {csv_path}: data row {number} names no image (its "
                            f"{cfg.image_column} is empty): fill it in, or remove the row")
        label = class_name((row.get(cfg.label_column) or "").strip()) if has_labels else None
        if cfg.filter_label is not None and label != cfg.filter_label:
            continue
        match = names.match(name)
        if name in seen:
            raise UserError(f"labels CSV {csv_path}: '{name}' is listed twice")
        seen.add(name)
        if match is None:
            missing.append(name)
            continue
        if match in chosen:  # the same file spelt another way (no suffix, ./)
            raise UserError(f"labels CSV {csv_path}: '{name}' is {match.relative_to(root)}, "
                            f"which an earlier row lists too")
        chosen.append(match)
        labels.append(label)
    if missing:  # as an unreadable file is: skipped and said, or refused
        shown = (", ".join(missing[:3])
                 + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        said = (f"labels CSV {csv_path} names {len(missing)} image(s) not found under {root}: "
                f"{shown}")
        if cfg.on_error != "skip" or not chosen:
            raise UserError(f"{said}; remove their rows, or put the files there")
        log(f"warning: {said}; left out (data.on_error=skip)")
    if not chosen and cfg.filter_label is not None:
        present = sorted({(r.get(cfg.label_column) or "").strip() for r in rows})
        raise UserError(f"no rows of {csv_path} have {cfg.label_column} == '{cfg.filter_label}' "
                        f"(labels present: {', '.join(present[:10])})")
    if not chosen and files:
        raise UserError(f"labels CSV {csv_path} lists none of the {len(files)} images under "
                        f"{root}: give a row per image ({cfg.image_column}, {cfg.label_column})")
    if cfg.filter_label is None and len(chosen) < len(files):  # selected by the CSV: said
        unlisted = sorted(set(files) - set(chosen))
        log(f"note: labels CSV {csv_path} has no row for {len(unlisted)} of the {len(files)} "
            f"images under {root} (e.g. {escape_controls(unlisted[0].relative_to(root))}): "
            f"they are left out")
    return chosen, (labels if has_labels else None)


# ---------------------------------------------------------------------------------------------
# arrays


def refuse_misnamed_array(path: Path) -> None:
    """numpy reads a file by its first bytes, not its name: an .npy array named .npz (or an .npz
    archive named .npy) would be read as the other kind."""
    with open(path, "rb") as f:
        magic = f.read(6)
    kind = ".npy" if magic == b"\x93NUMPY" else ".npz" if magic[:2] == b"PK" else None
    if kind is not None and kind != path.suffix.lower():
        raise UserError(f"{path} is an {kind} {'array' if kind == '.npy' else 'archive'} under an "
                        f"{path.suffix} name: rename it to {path.stem}{kind}")


def _load_array_file(path: Path, split: str, bit_depth: int | None = None) -> ImageData:
    key, labels = None, None
    try:
        refuse_misnamed_array(path)
        if path.suffix.lower() == ".npy":
            refuse_split_of_npy(path, split)
            with open(path, "rb") as f:
                _check_npy_header(f, path.stat().st_size, str(path))
            arr = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                key = _pick_npz_key(path, list(z.keys()), split)
                check_npz_member(path, key)
                arr = z[key]
                label_key = _labels_key(key)
                if label_key != key and label_key in z:
                    check_npz_member(path, label_key)
                    labels = z[label_key]
    except ValueError as exc:
        if "pickle" in str(exc):  # numpy falls back to unpickling what isn't an array file: refused
            raise UserError(_PICKLED.format(path)) from None
        raise UserError(f"cannot read {path}: {exc}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    name = f"{path}" + (f"[{key}]" if key else "")
    arr = as_nchw(arr, name)
    scale = value_scale(arr, name, bit_depth)
    images = array_to_uint8_nchw(arr, name, scale)
    label_list = None if labels is None else _label_list(
        labels, len(images), f"{path}[{_labels_key(key)}]")
    desc = f"{len(images)} images from {path}" + (f" [{key}]" if key else "") + scales_note(scale)
    return ImageData(images, desc, labels=label_list, source_path=name, bit_depth=scale.bit_depth)


def _label_list(labels: np.ndarray, count: int, where: str) -> list[str]:
    labels = np.asarray(labels)
    if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
        raise UserError(f"{where} has shape {labels.shape}: one-hot or multi-label labels; "
                        f"ddpmkit needs one class per image (e.g. labels.argmax(1) for one-hot)")
    if labels.size != count:
        raise UserError(f"{where} holds {labels.size} labels for {count} images: "
                        f"give one per image")
    labels = labels.reshape(-1)
    if labels.dtype.kind == "f":
        if not (np.isfinite(labels).all() and (labels % 1 == 0).all()):
            raise UserError(f"{where} holds fractional values (e.g. {labels[labels % 1 != 0][0]:g})"
                            f": labels name classes; give integers or names")
        labels = labels.astype(np.int64)  # 3.0 names the same class as 3
    if labels.dtype.kind == "S":  # byte strings: b"cat" names the class cat, not "b'cat'"
        labels = np.char.decode(labels, "utf-8", "replace")
    return [class_name(str(v).strip()) for v in labels]  # stripped, as a CSV's are


_PICKLED = ("cannot read {}: not a NumPy array file, or it holds Python objects, which ddpmkit "
            "never unpickles: save plain numeric arrays")
_NPY_HEADERS = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}


_SMALLER = "use data.stream=true for an .npy, or a smaller file"


def _check_npy_header(f, stored: int, name: str, fix: str = _SMALLER) -> None:
    """An .npy's declared shape against the bytes it holds (`stored`, after its header) and the
    memory it would take, read from its header before any data."""
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise UserError(_PICKLED.format(name)) from None
    if version[0] not in _NPY_HEADERS:
        raise UserError(f"cannot read {name}: .npy format version {version} "
                        f"(ddpmkit reads 1.0 and 2.0)")
    shape, _, dtype = _NPY_HEADERS[version[0]](f)
    if dtype.hasobject:
        raise UserError(_PICKLED.format(name))
    declared = math.prod(shape) * dtype.itemsize
    if declared > stored - f.tell():
        raise UserError(f"{name} declares an array of shape {shape} ({declared:,} bytes) but holds "
                        f"{stored - f.tell():,}: the file is damaged or not what it says")
    check_memory(2 * declared, f"{name} (shape {shape}, {dtype})", fix)


def check_npz_member(path: Path, key: str, fix: str = _SMALLER) -> None:
    """An .npz member's declared shape against its stored (uncompressed) size and the memory it
    takes, before numpy inflates it: a few compressed megabytes can inflate to gigabytes."""
    with zipfile.ZipFile(path) as z:
        # the member numpy reads for this key: one named exactly `key` before `key`.npy
        info = z.getinfo(key if key in z.namelist() else f"{key}.npy")
        with z.open(info) as f:
            _check_npy_header(f, info.file_size, f"{path}[{key}]", fix)


def refuse_split_of_npy(path: Path, split: str) -> None:
    if split != "train":
        raise UserError(f"data.split={split}: {path} is one array with no splits: point data.path "
                        f"at the {split} images instead (or an .npz with {split}_images)")


def _labels_key(images_key: str) -> str:
    """The labels beside an .npz's images: train_images -> train_labels, Keras' x -> y."""
    return "y" if images_key == "x" else images_key.replace("images", "labels")


def _pick_npz_key(path: Path, keys: list[str], split: str) -> str:
    """{split}_images; for the default split a lone or generically named array too. Any other
    split must be there by name: falling back to the training images would mislabel them as
    test or val data."""
    if f"{split}_images" in keys:
        return f"{split}_images"
    if split != "train":
        raise UserError(f"{path} has no '{split}' split "
                        f"(no '{split}_images' among {', '.join(keys)})")
    for key in ("images", "x", "arr_0"):
        if key in keys:
            return key
    if len(keys) == 1:
        return keys[0]
    raise UserError(f"{path} holds {', '.join(keys)}: "
                    f"expected '{split}_images' (set data.split) or 'images'")


# ---------------------------------------------------------------------------------------------
# MNIST-style IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _is_idx(path: Path) -> bool:
    return ("idx" in path.name and path.is_file()
            and path.suffix.lower() not in {".npy", ".npz", *IMAGE_SUFFIXES})


def is_idx_data(path: Path) -> bool:
    """An MNIST-style IDX file, or a folder holding IDX image files (read as IDX, not as images)."""
    return _is_idx(path) or (path.is_dir() and bool(_idx_files(path)))


# train-images-idx3-ubyte(.gz), *.idx3-ubyte
_IDX_IMAGE_NAME = re.compile(r"idx3[-.]ubyte(\.gz)?$", re.IGNORECASE)


def _idx_files(folder: Path) -> list[Path]:
    """The IDX image files of a folder, by name (not a checksum or note beside them)."""
    return sorted(p for p in folder.iterdir() if _IDX_IMAGE_NAME.search(p.name) and p.is_file())


def read_idx(path: Path) -> np.ndarray:
    """An IDX file's array. The header's dimensions are checked against memory before the data is
    read, and only the bytes they declare are (a small .gz can inflate without end)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
                raise UserError(f"{path} is not an IDX file (bad magic number)")
            raw_dims = f.read(4 * head[3])
            if len(raw_dims) < 4 * head[3]:
                raise UserError(f"IDX file {path} is truncated: its header ends early")
            dims = struct.unpack(f">{head[3]}I", raw_dims)
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            expected = math.prod(dims) * dtype.itemsize  # Python integers: no wrap-around to 0
            check_memory(2 * expected, f"IDX file {path} (dimensions {dims})", "check the file")
            body = f.read(expected)
            padded = bool(f.read(1))
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from None
    if len(body) != expected or padded:
        shown = f"more than {expected}" if padded else len(body)
        raise UserError(f"IDX file {path} is truncated or padded: "
                        f"{shown} bytes of data, expected {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


_IDX_SPLIT_WORDS = {"train": ("train",), "test": ("t10k", "test"), "t10k": ("t10k", "test")}


def _idx_file_of_split(name: str, split: str) -> bool:
    """MNIST's train-/t10k- prefixes, EMNIST's -train-/-test- infixes (whole words: not
    'latest')."""
    return any(re.search(rf"(^|[-_.]){word}([-_.]|$)", name.lower())
               for word in _IDX_SPLIT_WORDS[split])


def _idx_labels_file(images: Path) -> Path | None:
    """The labels beside an IDX image file: train-images-idx3-ubyte -> train-labels-idx1-ubyte,
    in the same spelling (Kaggle's train-images.idx3-ubyte too), gzipped or not."""
    name = re.sub(r"images([-.])idx3", r"labels\1idx1", images.name).removesuffix(".gz")
    found = [p for p in (images.with_name(name), images.with_name(name + ".gz"))
             if p != images and p.is_file()]
    return found[0] if found else None


def _load_idx(path: Path, split: str, bit_depth: int | None = None) -> ImageData:
    if split not in _IDX_SPLIT_WORDS:
        raise UserError(f"data.split={split}: "
                        f"MNIST-style IDX files hold 'train' and 'test' (t10k) splits only")
    if path.is_dir():
        candidates = _idx_files(path)
        preferred = [p for p in candidates if _idx_file_of_split(p.name, split)]
        if split != "train" and not preferred:
            raise UserError(f"{path} has no '{split}' split: no {split}/t10k IDX image file among "
                            f"{', '.join(p.name for p in candidates)}")
        if not preferred and any(_idx_file_of_split(p.name, "test") for p in candidates):
            raise UserError(f"{path} has no 'train' split, only {candidates[0].name} (the test "
                            f"split): set data.split=test, or point data.path at that file")
        if len(preferred) == 1 or len(candidates) == 1:
            path = (preferred or candidates)[0]
        else:
            raise UserError(f"{path} holds several IDX image files "
                            f"({', '.join(p.name for p in candidates)}): point data.path at one")
    elif split != "train" and not _idx_file_of_split(path.name, split):
        raise UserError(f"data.split={split}: {path} is one IDX file, not the {split} split: "
                        f"point data.path at the {split} file or its folder")
    arr = as_nchw(read_idx(path), str(path))
    scale = value_scale(arr, str(path), bit_depth)
    images = array_to_uint8_nchw(arr, str(path), scale)
    label_path = _idx_labels_file(path)
    labels = None
    if label_path is not None:
        labels = [str(int(v)) for v in read_idx(label_path).reshape(-1)]
        if len(labels) != len(images):
            raise UserError(f"{label_path} holds {len(labels)} labels for the {len(images)} images "
                            f"of {path.name}: use the labels file of the same split")
    return ImageData(images, f"{len(images)} images from {path}" + scales_note(scale),
                     labels=labels, source_path=str(path), bit_depth=scale.bit_depth)
