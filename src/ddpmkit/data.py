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
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .config import DataConfig
from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass
class ImageData:
    images: torch.Tensor  # uint8, N x C x H x W
    source: str  # what was read, for logs and the run record
    labels: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why) for unreadable images
    files: list[str] | None = None  # each image's file, for folders
    source_path: str = ""  # the file or folder read (arrays: with their key), for manifests
    bit_depth: int | None = None  # the depth wide integer pixels were read at (None: there were none)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]


def load_images(cfg: DataConfig) -> ImageData:
    if cfg.path is None:
        data = _load_digits()
    else:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise UserError(f"data path not found: {path}")
        refuse_labels_off_folder(path, cfg)
        if is_idx_data(path):
            data = _load_idx(path, cfg.split, cfg.bit_depth)
        elif path.is_dir():
            data = _load_folder(split_folder(path, cfg), cfg)
        elif path.suffix.lower() in (".npy", ".npz"):
            data = _load_array_file(path, cfg.split, cfg.bit_depth)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            raise UserError(f"data path {path} is a single image: point data.path at its folder")
        else:
            raise UserError(f"data path {path}: not a folder, .npy/.npz or IDX file")
    images = set_channels(data.images, cfg.channels)
    data.images = resize_center_crop(images, cfg.image_size)
    return data


def refuse_labels_off_folder(path: Path, cfg: DataConfig) -> None:
    """data.labels (a CSV) names images in a folder: for arrays and IDX files it would be ignored."""
    if cfg.labels is not None and (not path.is_dir() or is_idx_data(path)):
        raise UserError(f"data.labels={cfg.labels} names images in a folder, and {path} is not a folder of images: "
                        f"drop data.labels (an .npz takes labels from its *_labels arrays, IDX from its labels file)")


def class_order(labels) -> list[str]:
    """The distinct labels in a stable order: integers numerically (2 before 10), then names."""
    def key(c: str):
        numeric = c.lstrip("-").isdigit()
        return (not numeric, int(c) if numeric else 0, c)

    return sorted(set(labels), key=key)


def image_digests(images: torch.Tensor) -> list[str]:
    """sha256 of each uint8 image's bytes: identity at a given size, for the leakage guard."""
    return [hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images]


def batch_to_model(images_u8: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 N x C x H x W -> float in [-1, 1]; images where the bool mask `flip` is set are mirrored."""
    x = images_u8.float() / 127.5 - 1.0
    if flip is not None:
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x


# ---------------------------------------------------------------------------------------------
# geometry and channels


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size` (antialiased bicubic), then center-crop to size x size."""
    n, c, h, w = images.shape
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(images.float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        images = x[:, :, top:top + size, left:left + size].round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


def set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma, as PIL's "L"
    return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# bundled default


def _load_digits() -> ImageData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    arr = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
    return ImageData(torch.from_numpy(arr)[:, None], "scikit-learn digits (1797 images, 8x8)",
                     labels=[str(int(v)) for v in digits.target], source_path="sklearn.datasets.load_digits")


# ---------------------------------------------------------------------------------------------
# folders of images


SPLIT_FOLDERS = ("train", "val", "valid", "validation", "test", "dev")


def _split_subfolders(root: Path) -> list[Path]:
    """The split folders of a folder whose every subfolder is named as a split and that has no image
    beside them (a README or LICENSE may be); [] for any other folder."""
    entries = [p for p in root.iterdir() if not p.name.startswith((".", "__"))]  # .ipynb_checkpoints, __MACOSX
    subdirs = [p for p in entries if p.is_dir()]
    loose_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    is_split = not loose_images and all(p.name.lower() in SPLIT_FOLDERS for p in subdirs)
    return subdirs if is_split else []


def has_named_splits(path: str | Path) -> bool:
    """Whether data.split chooses among parts of `path` (an .npz, an IDX folder, a train/val/test
    folder) rather than `path` being one split itself (a plain folder, an .npy, one IDX file)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return is_idx_data(path) or bool(_split_subfolders(path))
    return path.suffix.lower() == ".npz"


def split_folder(root: Path, cfg: DataConfig) -> Path:
    """A folder split into train/, val/, test/ (every subfolder a split's name, no image beside them;
    the usual layout of published datasets) is read one split at a time: data.split picks it, so the
    splits are never taken for classes. Any other folder is one split, the default one."""
    subdirs = _split_subfolders(root) if cfg.labels is None else []
    if subdirs:
        chosen = [p for p in subdirs if p.name.lower() == cfg.split.lower()]
        if not chosen:
            raise UserError(f"{root} is split into {', '.join(sorted(p.name for p in subdirs))} and has no "
                            f"'{cfg.split}' split: set data.split to one of them")
        return chosen[0]
    if cfg.split != "train":
        why = "a CSV, data.labels, names its images" if cfg.labels is not None else "no train/val/test folders"
        raise UserError(f"data.split={cfg.split}: {root} has no splits ({why}): point data.path at the "
                        f"{cfg.split} images instead")
    return root


def list_image_files(root: Path, cfg: DataConfig) -> tuple[list[Path], list[str] | None]:
    """The folder's images (recursive, sorted), selected and labelled by the CSV if one is given."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    labels = None
    if cfg.labels is not None:
        files, labels = _select_by_csv(root, files, cfg)
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")
    if labels is None:
        labels = _class_folder_labels(root, files)
    return files, labels


def _class_folder_labels(root: Path, files: list[Path]) -> list[str] | None:
    """root/<class>/image.png: the first folder level names the class, when every image has one
    and there are at least two (a single subfolder is just where the images are)."""
    parts = [f.relative_to(root).parts for f in files]
    if any(len(p) < 2 for p in parts):
        return None
    labels = [p[0] for p in parts]
    return labels if len(set(labels)) > 1 else None


def _load_folder(root: Path, cfg: DataConfig) -> ImageData:
    files, labels = list_image_files(root, cfg)

    decoded, kept_labels, kept_files, skipped = [], [], [], []
    for i, path in enumerate(files):
        try:
            decoded.append(read_pixels(path))
            kept_labels.append(labels[i] if labels else None)
            kept_files.append(str(path))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            if cfg.on_error == "fail":
                raise UserError(f"cannot read image {path}: {exc} (set data.on_error=skip to skip such files)") from None
            skipped.append((str(path), str(exc) or type(exc).__name__))
    if not decoded:
        raise UserError(f"none of the {len(files)} images under {root} could be read (first: {skipped[0][0]}: {skipped[0][1]})")

    scales = image_scales(decoded, f"the images under {root}", cfg.bit_depth)
    gray = cfg.channels == 1 or (cfg.channels is None and all(a.ndim == 2 for a in decoded))
    # mixed sizes become one size
    tensors = [image_to_tensor(scaled_image(arr, scales), gray, cfg.image_size) for arr in decoded]
    desc = f"{len(tensors)} images from {root}" + (f" ({len(skipped)} skipped)" if skipped else "")
    return ImageData(torch.cat(tensors), desc + scales_note(*scales.values()), labels=kept_labels if labels else None,
                     skipped=skipped, files=kept_files, source_path=str(root), bit_depth=resolved_depth(*scales.values()))


def scales_note(*scales: ValueScale) -> str:
    """How wide values were read, for the data's description (training prints it)."""
    return "".join(f", {s.note}" for s in scales if s.note)


def resolved_depth(*scales: ValueScale) -> int | None:
    return next((s.bit_depth for s in scales if s.bit_depth is not None), None)


def image_to_tensor(arr: np.ndarray, gray: bool, size: int) -> torch.Tensor:
    """A decoded H x W (x 3) image -> uint8 1 x C x size x size, in the dataset's channel count."""
    if gray and arr.ndim == 3:
        arr = np.asarray(Image.fromarray(arr).convert("L"))
    elif not gray and arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    t = torch.from_numpy(np.array(arr))  # a writable copy
    t = t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]
    return resize_center_crop(t, size)


WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # one channel, values wider than 8 bits


def read_pixels(path: Path) -> np.ndarray:
    """Decode fully (so truncation is caught here): uint8 H x W (gray) or H x W x 3, or the stored
    values (H x W) of a 16-bit, 32-bit or float image, for `image_scales` to map to 0..255."""
    with Image.open(path) as im:
        im.load()
        if im.mode in WIDE_MODES:
            return np.array(im)
        if im.mode in GRAY_MODES:
            return np.asarray(im.convert("L"))
        return np.asarray(im.convert("RGB"))


def decode_image(path: Path) -> np.ndarray:
    """One image on its own (a mask) as uint8 H x W or H x W x 3: wide values are scaled by this
    image's own range. Datasets use `image_scales` over all their images."""
    arr = read_pixels(path)
    return scaled_image(arr, image_scales([arr], str(path)))


def _select_by_csv(root: Path, files: list[Path], cfg: DataConfig) -> tuple[list[Path], list[str] | None]:
    csv_path = Path(cfg.labels).expanduser()
    if not csv_path.is_file():
        raise UserError(f"labels CSV not found: {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except UnicodeDecodeError:
        raise UserError(f"labels CSV {csv_path} is not UTF-8 text: save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise UserError(f"labels CSV {csv_path} cannot be read as CSV: {exc}") from None
    if cfg.image_column not in columns:
        raise UserError(f"labels CSV {csv_path} has no column '{cfg.image_column}' (columns: {', '.join(columns)}); "
                        f"set data.image_column")
    has_labels = cfg.label_column in columns
    if cfg.filter_label is not None and not has_labels:
        raise UserError(f"labels CSV {csv_path} has no column '{cfg.label_column}' to filter on "
                        f"(columns: {', '.join(columns)}); set data.label_column")

    by_rel = {p.relative_to(root).as_posix(): p for p in files}
    by_stem: dict[str, list[Path]] = {}
    for rel, p in by_rel.items():
        by_stem.setdefault(str(PurePosixPath(rel).with_suffix("")), []).append(p)
        by_stem.setdefault(p.stem, []).append(p)

    chosen, labels, missing, seen = [], [], [], set()
    for row in rows:
        name = (row.get(cfg.image_column) or "").strip()
        label = (row.get(cfg.label_column) or "").strip() if has_labels else None
        if cfg.filter_label is not None and label != cfg.filter_label:
            continue
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts:
            raise UserError(f"labels CSV {csv_path}: '{name}' points outside the data folder {root}")
        if name in seen:
            raise UserError(f"labels CSV {csv_path}: '{name}' is listed twice")
        seen.add(name)
        match = by_rel.get(pure.as_posix()) or _unique(by_stem.get(pure.as_posix(), []))
        if match is None:
            missing.append(name)
            continue
        chosen.append(match)
        labels.append(label)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"labels CSV {csv_path} names {len(missing)} image(s) not found under {root}: {shown}")
    if not chosen and cfg.filter_label is not None:
        present = sorted({(r.get(cfg.label_column) or "").strip() for r in rows})
        raise UserError(f"no rows of {csv_path} have {cfg.label_column} == '{cfg.filter_label}' "
                        f"(labels present: {', '.join(present[:10])})")
    return chosen, (labels if has_labels else None)


def _unique(paths: list[Path]) -> Path | None:
    return paths[0] if len(set(paths)) == 1 else None


# ---------------------------------------------------------------------------------------------
# arrays


def _load_array_file(path: Path, split: str, bit_depth: int | None = None) -> ImageData:
    try:
        if path.suffix.lower() == ".npy":
            refuse_split_of_npy(path, split)
            arr, labels, key = np.load(path, allow_pickle=False), None, None
        else:
            with np.load(path, allow_pickle=False) as z:
                key = _pick_npz_key(path, list(z.keys()), split)
                arr = z[key]
                label_key = key.replace("images", "labels")
                labels = z[label_key] if label_key != key and label_key in z else None
    except ValueError as exc:
        if "pickle" in str(exc):  # numpy falls back to unpickling what is not an array file: refused
            raise UserError(f"cannot read {path}: not a NumPy array file, or it holds Python objects, which "
                            f"ddpmkit never unpickles: save plain numeric arrays") from None
        raise UserError(f"cannot read {path}: {exc}") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    name = f"{path}" + (f"[{key}]" if key else "")
    arr = as_nchw(arr, name)
    scale = value_scale(arr, name, bit_depth)
    images = array_to_uint8_nchw(arr, name, scale)
    label_list = None
    if labels is not None:
        labels = np.asarray(labels)
        where = f"{path}[{key.replace('images', 'labels')}]"
        if labels.ndim > 2 or (labels.ndim == 2 and labels.shape[1] != 1):
            raise UserError(f"{where} has shape {labels.shape}: one-hot or multi-label labels; ddpmkit needs one "
                            f"class per image (e.g. labels.argmax(1) for one-hot)")
        if labels.size != len(images):
            raise UserError(f"{where} holds {labels.size} labels for {len(images)} images: give one per image")
        label_list = [str(v) for v in labels.reshape(-1)]
    desc = f"{len(images)} images from {path}" + (f" [{key}]" if key else "") + scales_note(scale)
    return ImageData(images, desc, labels=label_list, source_path=name, bit_depth=scale.bit_depth)


def refuse_split_of_npy(path: Path, split: str) -> None:
    if split != "train":
        raise UserError(f"data.split={split}: {path} is one array with no splits: point data.path at the "
                        f"{split} images instead (or an .npz with {split}_images)")


def _pick_npz_key(path: Path, keys: list[str], split: str) -> str:
    """{split}_images; for the default split a lone or generically named array too. Any other split must
    be there by name: falling back to the training images would mislabel them as test or val data."""
    if f"{split}_images" in keys:
        return f"{split}_images"
    if split != "train":
        raise UserError(f"{path} has no '{split}' split (no '{split}_images' among {', '.join(keys)})")
    for key in ("images", "x", "arr_0"):
        if key in keys:
            return key
    if len(keys) == 1:
        return keys[0]
    raise UserError(f"{path} holds {', '.join(keys)}: expected '{split}_images' (set data.split) or 'images'")


def as_nchw(arr: np.ndarray, name: str) -> np.ndarray:
    """(N,H,W), (N,H,W,C) or (N,C,H,W) -> N x C x H x W with C 1 or 3 (alpha dropped); checked."""
    arr = np.asarray(arr)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = arr.transpose(0, 3, 1, 2)
        elif arr.shape[1] not in (1, 3, 4):
            raise UserError(f"{name}: shape {arr.shape} has no channel axis of size 1, 3 or 4")
    else:
        raise UserError(f"{name}: shape {arr.shape}; expected (N,H,W), (N,H,W,C) or (N,C,H,W)")
    if arr.shape[0] == 0:
        raise UserError(f"{name}: holds no images")
    if arr.size == 0:
        raise UserError(f"{name}: shape {arr.shape} has images of zero size")
    return arr[:, :3] if arr.shape[1] == 4 else arr  # drop alpha


def array_to_uint8_nchw(arr: np.ndarray, name: str, scale: ValueScale | None = None) -> torch.Tensor:
    """An image array in any layout `as_nchw` takes, uint8/uint16/bool/float -> uint8 N x C x H x W.
    `scale` (default: the array's own, `value_scale`) maps its values to 0..255: batches read from
    one file share their file's."""
    arr = as_nchw(arr, name)
    scale = scale if scale is not None else value_scale(arr, name)
    return torch.from_numpy(np.array(scale.apply(arr), dtype=np.uint8))  # a writable, contiguous copy


# ---------------------------------------------------------------------------------------------
# pixel values: one mapping to 0..255 for a whole dataset

BIT_DEPTHS = (8, 10, 12, 14, 16)  # what an unset data.bit_depth chooses among


@dataclass(frozen=True)
class ValueScale:
    """uint8 = round((value - low) * 255 / (high - low)), clipped to 0..255. `bit_depth`: the depth
    integer values were read at; `note` says so, for the data's description."""
    low: float = 0.0
    high: float = 255.0
    bit_depth: int | None = None
    note: str = ""

    def apply(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype == np.uint8 and (self.low, self.high) == (0, 255):
            return arr
        x = (arr.astype(np.float64) - self.low) * (255.0 / (self.high - self.low))
        return np.clip(np.round(x), 0, 255).astype(np.uint8)


def value_scale(arr: np.ndarray, name: str, bit_depth: int | None = None) -> ValueScale:
    """The scale of an array holding a whole dataset (N x C x H x W, alpha dropped)."""
    if arr.dtype == np.bool_:
        return ValueScale(0, 1)
    if arr.dtype == np.uint8 or arr.size == 0:  # an empty array is refused with its shape
        return ValueScale()
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise UserError(f"{name}: unsupported dtype {arr.dtype}")
    return range_scale(arr.dtype.kind == "f", arr.min().item(), arr.max().item(), name, bit_depth)


def image_scales(images, name: str, bit_depth: int | None = None) -> dict[str, ValueScale]:
    """One scale for all of a dataset's integer images wider than 8 bits ("i") and one for its float
    images ("f"), from one pass over `images` (decoded arrays, any iterable): never decided per image,
    so a dark 16-bit image is not read as an 8-bit one."""
    ranges: dict[str, tuple[float, float]] = {}
    for arr in images:
        if arr.dtype == np.uint8:
            continue
        kind = "f" if arr.dtype.kind == "f" else "i"
        lo, hi = arr.min().item(), arr.max().item()
        if not (np.isfinite(lo) and np.isfinite(hi)):  # here: min() and max() below would drop a NaN
            raise UserError(f"{name}: an image contains NaN or infinite values")
        if kind in ranges:
            lo, hi = min(lo, ranges[kind][0]), max(hi, ranges[kind][1])
        ranges[kind] = (lo, hi)
    floats = ranges.get("f")
    if floats and _float_range(*floats) is None and "i" in ranges:
        # floats beyond the usual ranges are read as integers: with the integer images, at one depth
        ranges["i"] = ranges["f"] = (min(floats[0], ranges["i"][0]), max(floats[1], ranges["i"][1]))
    return {kind: range_scale(kind == "f", lo, hi, name, bit_depth, image_files=True)
            for kind, (lo, hi) in ranges.items()}


def scaled_image(arr: np.ndarray, scales: dict[str, ValueScale]) -> np.ndarray:
    """A decoded image in uint8, through its dataset's `image_scales`."""
    return arr if arr.dtype == np.uint8 else scales["f" if arr.dtype.kind == "f" else "i"].apply(arr)


def _float_range(lo: float, hi: float) -> tuple[int, int] | None:
    """The usual range of float pixels that [lo, hi] lies in: [0,1], [-1,1] or [0,255]."""
    return next(((low, high) for low, high in ((0, 1), (-1, 1), (0, 255)) if lo >= low and hi <= high), None)


def range_scale(is_float: bool, lo, hi, name: str, bit_depth: int | None, image_files: bool = False) -> ValueScale:
    """Floats in [0,1], [-1,1] or [0,255] map from that range. Integers are read at data.bit_depth or,
    unset, at the smallest of 8, 10, 12, 14 or 16 bits holding the largest value, so 12-bit X-rays
    stored in 16-bit files are not nearly black (bit_depth 0, which runs from before the key was
    added record: 8 or 16 bits, as they were read then). Image files (32-bit and float TIFFs) may hold
    other values: those are read as integers, clipped to 0..65535; arrays holding them are refused."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise UserError(f"{name}: contains NaN or infinite values")
    if is_float:
        usual = _float_range(lo, hi)
        if usual == (0, 255) and hi <= 2:  # [0, 1] data a little past 1, not 0..255 data all nearly black
            raise UserError(f"{name}: float values in [{lo:.3g}, {hi:.3g}] are past [0,1] yet would be nearly black "
                            f"read as [0,255]: rescale them to [0,1] (e.g. divide by the largest value)")
        if usual:
            return ValueScale(*usual)
        if not image_files:
            raise UserError(f"{name}: float values in [{lo:.3g}, {hi:.3g}]; expected [0,1], [-1,1] or [0,255]")
    clipped, largest = "", hi
    if lo < 0 or hi > 65535:
        if not image_files:
            raise UserError(f"{name}: integer values in [{lo}, {hi}]; expected 0..255 or 0..65535")
        clipped, hi = f", clipped from [{lo:.6g}, {hi:.6g}] to 0..65535", min(hi, 65535)
    depth = bit_depth or next(d for d in ((8, 16) if bit_depth == 0 else BIT_DEPTHS) if hi < 2 ** d)
    if hi >= 2 ** depth:
        raise UserError(f"{name}: values up to {largest:.6g} do not fit data.bit_depth={depth} (yours, or the one a run "
                        f"recorded): use at least {int(hi).bit_length()} bits, or for a run, start over with --fresh")
    why = "as read before data.bit_depth existed" if bit_depth == 0 else "data.bit_depth sets the depth"
    note = f"{depth}-bit values (largest {hi:.6g}{clipped}; {why})"
    return ValueScale(0, 2 ** depth - 1, depth, note if depth != 8 or clipped else "")


# ---------------------------------------------------------------------------------------------
# MNIST-style IDX

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _is_idx(path: Path) -> bool:
    return "idx" in path.name and path.is_file() and path.suffix.lower() not in {".npy", ".npz", *IMAGE_SUFFIXES}


def is_idx_data(path: Path) -> bool:
    """An MNIST-style IDX file, or a folder holding IDX image files (read as IDX, not as images)."""
    return _is_idx(path) or (path.is_dir() and bool(_idx_files(path)))


_IDX_IMAGE_NAME = re.compile(r"idx3[-.]ubyte(\.gz)?$", re.IGNORECASE)  # train-images-idx3-ubyte(.gz), *.idx3-ubyte


def _idx_files(folder: Path) -> list[Path]:
    """The IDX image files of a folder, by name (not a checksum or note beside them)."""
    return sorted(p for p in folder.iterdir() if _IDX_IMAGE_NAME.search(p.name) and p.is_file())


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"IDX file {path} is truncated: its header ends early")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise UserError(f"IDX file {path} is truncated or padded: {len(body)} bytes of data, expected {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


_IDX_SPLIT_WORDS = {"train": ("train",), "test": ("t10k", "test"), "t10k": ("t10k", "test")}


def _idx_file_of_split(name: str, split: str) -> bool:
    """MNIST's train-/t10k- prefixes, EMNIST's -train-/-test- infixes (whole words: not 'latest')."""
    return any(re.search(rf"(^|[-_.]){word}([-_.]|$)", name.lower()) for word in _IDX_SPLIT_WORDS[split])


def _load_idx(path: Path, split: str, bit_depth: int | None = None) -> ImageData:
    if split not in _IDX_SPLIT_WORDS:
        raise UserError(f"data.split={split}: MNIST-style IDX files hold 'train' and 'test' (t10k) splits only")
    if path.is_dir():
        candidates = _idx_files(path)
        preferred = [p for p in candidates if _idx_file_of_split(p.name, split)]
        if split != "train" and not preferred:
            raise UserError(f"{path} has no '{split}' split: no {split}/t10k IDX image file among "
                            f"{', '.join(p.name for p in candidates)}")
        if len(preferred) == 1 or len(candidates) == 1:
            path = (preferred or candidates)[0]
        else:
            raise UserError(f"{path} holds several IDX image files ({', '.join(p.name for p in candidates)}): "
                            f"point data.path at one")
    elif split != "train" and not _idx_file_of_split(path.name, split):
        raise UserError(f"data.split={split}: {path} is one IDX file, not the {split} split: point data.path at "
                        f"the {split} file or its folder")
    arr = as_nchw(read_idx(path), str(path))
    scale = value_scale(arr, str(path), bit_depth)
    images = array_to_uint8_nchw(arr, str(path), scale)
    label_path = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    labels = None
    if label_path != path and label_path.is_file():
        labels = [str(int(v)) for v in read_idx(label_path).reshape(-1)]
        if len(labels) != len(images):
            raise UserError(f"{label_path} holds {len(labels)} labels for the {len(images)} images of {path.name}: "
                            f"use the labels file of the same split")
    return ImageData(images, f"{len(images)} images from {path}" + scales_note(scale), labels=labels,
                     source_path=str(path), bit_depth=scale.bit_depth)
