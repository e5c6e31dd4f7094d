"""Training data read from disk batch by batch, so memory does not grow with the dataset.

`data.stream=true` swaps the in-memory tensor of `load_images` for a source that reads only the
images of the current batch: a memory-mapped `.npy` (the OS pages in what is touched) or a folder
whose images are decoded when drawn. DataLoader worker processes decode ahead of the GPU, and on
CUDA the batches arrive in pinned memory so the copy to the device does not block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import DataConfig
from .data import (is_idx_data, labelled, list_image_files, refuse_control_characters,
                   refuse_labels_off_folder, refuse_misnamed_array, refuse_split_of_npy,
                   resize_center_crop, set_channels, split_folder)
from .errors import UserError
from .pixels import (GRAY_MODES, IMAGE_SUFFIXES, UNREADABLE, WIDE_MODES, ValueScale,
                     array_to_uint8_nchw, as_nchw, image_scales, open_image, range_scale,
                     read_pixels, resolved_depth, scaled_image, scales_note, to_tensor, value_scale)


class NpyImages:
    """A memory-mapped .npy of N images in any layout `array_to_uint8_nchw` accepts."""

    def __init__(self, path: Path, cfg: DataConfig):
        refuse_misnamed_array(path)
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot memory-map {path}: {exc}") from None
        if self.array.ndim not in (3, 4) or len(self.array) == 0:
            raise UserError(f"{path}: shape {self.array.shape}; "
                            f"expected (N,H,W), (N,H,W,C) or (N,C,H,W)")
        if cfg.filter_label is not None:
            labelled(None, cfg.filter_label, str(path))  # an .npy names no classes
        self.path, self.cfg = path, cfg
        self.scale = _array_scale(self.array, str(path), cfg.bit_depth)  # one for every batch
        first = array_to_uint8_nchw(self.array[:1], str(path), self.scale)  # checks layout & dtype
        self.channels = cfg.channels or first.shape[1]
        self.source = (f"{len(self.array)} images streamed from {path} (memory-mapped)"
                       + scales_note(self.scale))
        self.labels, self.skipped, self.bit_depth = None, [], self.scale.bit_depth
        self.files, self.source_path = None, str(path)  # as ImageData names them

    def __len__(self) -> int:
        return len(self.array)

    def read(self, indices: np.ndarray) -> torch.Tensor:
        order = np.argsort(indices)  # sorted reads touch the file in order; undone below
        images = array_to_uint8_nchw(self.array[indices[order]], str(self.path), self.scale)
        images = resize_center_crop(set_channels(images, self.cfg.channels), self.cfg.image_size)
        return images[torch.from_numpy(np.argsort(order))]


class FolderImages:
    """A folder of image files, each decoded when a batch draws it. Headers are checked up front
    (cheap: no pixel is decoded), so a file whose header does not read is refused before training;
    with data.on_error=skip every file is decoded once instead, so a truncated one is skipped as
    the in-memory reader skips it, not met in the middle of training."""

    def __init__(self, root: Path, cfg: DataConfig, log=print):
        files, labels = list_image_files(root, cfg, log)
        refuse_control_characters(labels or (), str(root))
        if cfg.filter_label is not None:  # as in memory (a labels CSV has chosen them already)
            keep = labelled(labels, cfg.filter_label, str(root))
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        self.cfg, self.skipped = cfg, []
        decode = cfg.on_error == "skip"
        modes = [self._checked(path, lambda p: _mode(p, decode)) for path in files]
        # wide (16-bit, float) images share one scale: one pass over them before training finds it,
        # decoding one image at a time (memory stays flat) and skipping those that do not decode
        undecodable: set[int] = set()

        def wide_images():
            for i, mode in enumerate(modes):
                pixels = self._checked(files[i], read_pixels) if mode in WIDE_MODES else None
                if pixels is not None:
                    yield pixels
                elif mode in WIDE_MODES:
                    undecodable.add(i)

        self.scales = image_scales(wide_images(), f"the images under {root}", cfg.bit_depth)
        readable = [i for i, mode in enumerate(modes) if mode is not None and i not in undecodable]
        if not readable:
            raise UserError(f"none of the {len(files)} images under {root} could be read")
        self.files, self.source_path = [files[i] for i in readable], str(root)
        self.labels = [labels[i] for i in readable] if labels else None
        self.gray = cfg.channels == 1 or (cfg.channels is None
                                          and {modes[i] for i in readable} <= GRAY_MODES)
        self.channels = 1 if self.gray else 3
        self.bit_depth = resolved_depth(*self.scales.values())
        self.source = (f"{len(self.files)} images streamed from {root}"
                       + (f" (labelled by {cfg.labels})" if cfg.labels else "")
                       + (f" ({len(self.skipped)} skipped)" if self.skipped else "")
                       + scales_note(*self.scales.values()))

    def _checked(self, path: Path, read):
        """read(path), or None for an unreadable file, skipped (and reported) or refused by
        data.on_error."""
        try:
            return read(path)
        except UNREADABLE as exc:
            if self.cfg.on_error == "fail":
                raise UserError(f"cannot read image {path}: {exc} "
                                f"(set data.on_error=skip to skip such files)") from None
            self.skipped.append((str(path), str(exc) or type(exc).__name__))
            return None

    def __len__(self) -> int:
        return len(self.files)

    def _pixels(self, i: int) -> np.ndarray:
        try:
            return read_pixels(self.files[i])
        except UNREADABLE as exc:
            raise UserError(f"cannot decode image {self.files[i]}: {exc}; remove it or fix it, "
                            f"then rerun (a run resumes)") from None

    def read(self, indices: np.ndarray) -> torch.Tensor:
        return torch.cat([resize_center_crop(to_tensor(scaled_image(self._pixels(i), self.scales),
                                                       self.gray)[None],
                                             self.cfg.image_size) for i in indices])


def _mode(path: Path, decode: bool = False) -> str:
    with open_image(path) as im:
        if decode:
            im.load()
        return im.mode


def _array_scale(array: np.ndarray, name: str, bit_depth: int | None) -> ValueScale:
    """One scale for a memory-mapped array, from its range read a chunk at a time (a pass over the
    file before training; uint8 needs none)."""
    if array.dtype in (np.uint8, np.bool_):
        return value_scale(as_nchw(array[:1], name), name, bit_depth)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UserError(f"{name}: unsupported dtype {array.dtype}")
    chunk, lows, highs = max(1, 2 ** 24 // max(1, array[0].size)), [], []
    for i in range(0, len(array), chunk):  # one chunk in memory at a time
        part = as_nchw(np.asarray(array[i:i + chunk]), name)
        lows.append(part.min().item())
        highs.append(part.max().item())
    # numpy's min and max keep a NaN, which range_scale refuses (Python's would drop it)
    return range_scale(array.dtype.kind == "f", np.min(lows).item(), np.max(highs).item(),
                       name, bit_depth)


def open_stream(cfg: DataConfig, log=print):
    path = Path(cfg.path).expanduser() if cfg.path else None
    if path is None or not path.exists():
        raise UserError("data.stream=true needs data.path: a .npy file or a folder of images")
    refuse_labels_off_folder(path, cfg)
    if is_idx_data(path):
        raise UserError(f"data.stream=true reads .npy files and image folders, and {path} is "
                        f"MNIST-style IDX data: set data.stream=false (IDX data is small enough "
                        f"to load: MNIST's 60,000 images take 47 MB)")
    if path.is_dir():
        return FolderImages(split_folder(path, cfg), cfg, log)
    if path.suffix.lower() == ".npy":
        refuse_split_of_npy(path, cfg.split)
        return NpyImages(path, cfg)
    kind = ("a single image" if path.suffix.lower() in IMAGE_SUFFIXES
            else f"a {path.suffix or 'suffix-less'} file")
    raise UserError(f"data.stream=true reads .npy files and image folders, and {path} is {kind}: "
                    f"convert it (numpy.save) or set data.stream=false")


class StepBatches(torch.utils.data.Dataset):
    """Item s = this process's uint8 images of optimizer step s. Which images a step takes is a
    function of (seed, step) alone, so worker processes compute it independently and a resumed run
    reads exactly the batches the uninterrupted one would have."""

    def __init__(self, source, order, rows: slice, first_step: int, last_step: int):
        self.source, self.order, self.rows = source, order, rows
        self.first, self.last = first_step, last_step

    def __len__(self) -> int:
        return self.last - self.first

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.source.read(self.order.indices(self.first + i)[self.rows].numpy())


def batch_loader(source, order, rows: slice, first_step: int, last_step: int, *,
                 workers: int, pin: bool):
    dataset = StepBatches(source, order, rows, first_step, last_step)
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin, prefetch_factor=4 if workers else None,
                                       persistent_workers=False)
