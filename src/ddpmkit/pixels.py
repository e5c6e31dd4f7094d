"""Image files and arrays to uint8 tensors: the one reader every command uses.

Training data, streamed batches, restoration inputs, masks, generated images for evaluation and
the run report's grids all go through `read_image_files` (or its pieces, for streaming): decode,
then map values to 0..255 with one scale for the whole set, never per image, so a dark 16-bit
image is not read as an 8-bit one. Integers wider than 8 bits are read at a bit depth (8..16):
the one asked for, else the smallest of 8, 10, 12, 14, 16 that holds the largest value.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError
from .limits import check_memory

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # one channel, values wider than 8 bits
BIT_DEPTHS = (8, 10, 12, 14, 16)  # what an unset data.bit_depth chooses among
MAX_PIXELS = 64_000_000  # per image: 8000 x 8000; larger declared sizes are refused before decoding
_PILLOW_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is global: one header read at a time
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError,
              Image.DecompressionBombError)


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


@dataclass
class ImageFiles:
    """Decoded image files: uint8 C x H x W tensors of one channel count, their files, and those
    skipped."""
    images: list[torch.Tensor]
    files: list[Path]
    skipped: list[tuple[str, str]]
    scales: dict[str, ValueScale]

    @property
    def bit_depth(self) -> int | None:
        return resolved_depth(*self.scales.values())

    @property
    def note(self) -> str:
        return scales_note(*self.scales.values())


def open_image(path: Path) -> Image.Image:
    """An image file opened (its header read, no pixel decoded), refused when it declares more
    pixels than ddpmkit decodes. Pillow's own check (a warning, or an error without the size) is
    set aside while the header is read: this one names the size."""
    if not Path(path).exists():
        raise ValueError("no such file")
    if not Path(path).is_file():  # a pipe would block the open until something writes to it
        raise ValueError("it is not a regular file")
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    if im.width * im.height > MAX_PIXELS:
        im.close()
        raise ValueError(f"it declares {im.width}x{im.height} pixels, more than the {MAX_PIXELS:,} "
                         f"ddpmkit decodes per image")
    wide = [str(tile[3]) for tile in im.tile if ";16" in str(tile[3])]
    if im.format in ("PNG", "TIFF") and im.mode not in WIDE_MODES and wide:
        im.close()  # Pillow keeps only the top 8 bits of 16-bit colour: 12-bit data reads black
        kind = "gray image with transparency" if wide[0].startswith("LA") else "colour image"
        raise UserError(f"{path} is a 16-bit {kind}, which the image library reads only to "
                        f"8 bits: save the set as a uint16 .npy array (N x H x W x 3), which "
                        f"ddpmkit reads at its bit depth")
    return im


def read_pixels(path: Path) -> np.ndarray:
    """Decode fully (so truncation is caught here): uint8 H x W (gray) or H x W x 3, or the stored
    values (H x W) of a 16-bit, 32-bit or float image, for `image_scales` to map to 0..255."""
    with open_image(path) as im:
        if getattr(im, "n_frames", 1) > 1:  # a stack (multi-page TIFF): which page is the image?
            raise ValueError(f"it holds {im.n_frames} pages: save one image per file")
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # upright, as every viewer shows a photo
        if im.mode in WIDE_MODES:
            pixels = np.array(im)
            if not np.isfinite(pixels).all():  # named here, with its file, as unreadable
                raise ValueError("it holds NaN or infinite values")
            return pixels
        gray = im.mode in GRAY_MODES or (im.mode in ("P", "PA") and _gray_palette(im))
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            # laid on black, as masks are: what hides under alpha 0 is no part of the image
            black = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(black, im.convert("RGBA"))
        return np.asarray(im.convert("L" if gray else "RGB"))


def _gray_palette(im: Image.Image) -> bool:
    """Whether a palette image's colours are all grays (a gray PNG saved with a palette)."""
    rgb = np.array(im.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
    return bool((rgb == rgb[:, :1]).all())


def to_tensor(arr: np.ndarray, gray: bool) -> torch.Tensor:
    """A uint8 H x W (x 3) image -> uint8 C x H x W, in the set's channel count."""
    if gray and arr.ndim == 3:
        arr = np.asarray(Image.fromarray(arr).convert("L"))
    elif not gray and arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    t = torch.from_numpy(np.array(arr))  # a writable copy
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def read_image_files(files: list[Path], name: str, *, bit_depth: int | None = None,
                     channels: int | None = None, on_error: str = "fail", depth_of: str = "",
                     hint: str = "", fit=None) -> ImageFiles:
    """Decode `files` into uint8 tensors with one value scale for all (`name` names the set in
    errors). Gray unless some image has colour (or `channels` says). on_error 'skip' leaves out
    unreadable files (listed in .skipped); 'fail' refuses the first, adding `hint`. `depth_of`:
    whose bit depth `bit_depth` is, for the message when values do not fit it. `fit` (a resize)
    takes each image as soon as it is read, so a set of large photos is never held whole at full
    size; images wider than 8 bits are decoded twice for that (once for the set's value range).
    Without `fit`, the decoded size the headers declare is checked against memory first."""
    if fit is None:
        check_memory(2 * sum(map(declared_bytes, files)), f"decoding {name} at full size",
                     "give fewer or smaller images")
    fit = fit or (lambda image: image)
    images, kept, skipped, wide = [], [], [], []  # wide: (place in images, file), scaled later

    def decoded():
        for path in files:
            try:
                pixels = read_pixels(path)
            except UNREADABLE as exc:
                if on_error == "fail":
                    raise UserError(f"cannot read image {path}: {exc}{hint}") from None
                skipped.append((str(path), str(exc) or type(exc).__name__))
                continue
            kept.append(Path(path))
            if pixels.dtype == np.uint8:
                images.append(fit(to_tensor(pixels, gray=channels == 1 or pixels.ndim == 2)))
            else:
                wide.append((len(images), path))
                images.append(None)
            yield pixels

    scales = image_scales(decoded(), name, bit_depth, depth_of=depth_of)
    if not kept:
        first = f"; first: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise UserError(f"none of {name} could be read ({len(files)} tried{first})")
    for place, path in wide:
        try:
            pixels = read_pixels(path)
        except UNREADABLE as exc:  # it was read a moment ago
            raise UserError(f"cannot read image {path} again: {exc}: it changed while ddpmkit "
                            f"read the set") from None
        images[place] = fit(to_tensor(scaled_image(pixels, scales), gray=True))
    if channels == 3 or (channels is None and any(image.shape[0] == 3 for image in images)):
        images = [image.expand(3, -1, -1).contiguous() for image in images]
    return ImageFiles(images, kept, skipped, scales)


def declared_bytes(path: Path) -> int:
    """The bytes an image file's header says its pixels take decoded (0 if it cannot be read)."""
    try:
        with open_image(path) as im:
            return im.width * im.height * (4 if im.mode in WIDE_MODES else len(im.getbands()))
    except (*UNREADABLE, UserError):
        return 0


def read_image(path: str | Path) -> torch.Tensor:
    """One image file on its own (a grid, a mask, a generated PNG) as uint8 C x H x W."""
    return read_image_files([Path(path)], str(path)).images[0]


def read_mask(path: Path) -> torch.Tensor:
    """A mask file as bool 1 x H x W, True where it is white (above mid-gray). Transparency is laid
    on black first: painting tools often keep a stroke's shape only in its alpha."""
    try:
        with open_image(path) as im:
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                rgba = np.asarray(ImageOps.exif_transpose(im.convert("RGBA")), dtype=np.float32)
                return torch.from_numpy(rgba[..., :3].mean(-1) * rgba[..., 3] / 255 > 127)[None]
            # mid-gray of the file's own range: a 16-bit mask's 1000 is near black, not white
            depth = 16 if im.mode.startswith("I") else None
    except UNREADABLE as exc:
        raise UserError(f"cannot read mask {path}: {exc}") from None
    pixels = read_image_files([Path(path)], str(path), bit_depth=depth).images[0]
    return pixels.float().mean(0, keepdim=True) > 127


def image_scales(images, name: str, bit_depth: int | None = None, *,
                 depth_of: str = "") -> dict[str, ValueScale]:
    """One scale for all of a set's integer images wider than 8 bits ("i") and one for its float
    images ("f"), from one pass over `images` (decoded arrays, any iterable)."""
    ranges: dict[str, tuple[float, float]] = {}
    for arr in images:
        if arr.dtype == np.uint8:
            continue
        kind = "f" if arr.dtype.kind == "f" else "i"
        lo, hi = arr.min().item(), arr.max().item()
        if not (np.isfinite(lo) and np.isfinite(hi)):  # here: min(), max() below would drop a NaN
            raise UserError(f"{name}: an image contains NaN or infinite values")
        if kind in ranges:
            lo, hi = min(lo, ranges[kind][0]), max(hi, ranges[kind][1])
        ranges[kind] = (lo, hi)
    floats = ranges.get("f")
    if floats and _float_range(*floats) is None and "i" in ranges:
        # floats beyond the usual ranges are read as integers: with the integer images, at one depth
        ranges["i"] = ranges["f"] = (min(floats[0], ranges["i"][0]), max(floats[1], ranges["i"][1]))
    return {kind: range_scale(kind == "f", lo, hi, name, bit_depth, image_files=True,
                              depth_of=depth_of)
            for kind, (lo, hi) in ranges.items()}


def scaled_image(arr: np.ndarray, scales: dict[str, ValueScale]) -> np.ndarray:
    """A decoded image in uint8, through its set's `image_scales`."""
    return (arr if arr.dtype == np.uint8
            else scales["f" if arr.dtype.kind == "f" else "i"].apply(arr))


def scales_note(*scales: ValueScale) -> str:
    """How wide values were read, for the data's description (training prints it)."""
    return "".join(f", {s.note}" for s in scales if s.note)


def resolved_depth(*scales: ValueScale) -> int | None:
    return next((s.bit_depth for s in scales if s.bit_depth is not None), None)


def _float_range(lo: float, hi: float) -> tuple[int, int] | None:
    """The usual range of float pixels that [lo, hi] lies in: [0,1], [-1,1] or [0,255]."""
    return next(((low, high) for low, high in ((0, 1), (-1, 1), (0, 255))
                 if lo >= low and hi <= high), None)


def range_scale(is_float: bool, lo, hi, name: str, bit_depth: int | None, *,
                image_files: bool = False, depth_of: str = "") -> ValueScale:
    """Floats in [0,1], [-1,1] or [0,255] map from that range. Integers are read at `bit_depth` or,
    unset, at the smallest of 8, 10, 12, 14 or 16 bits holding the largest value, so 12-bit X-rays
    stored in 16-bit files are not nearly black. Image files (32-bit and float TIFFs) may hold other
    values: those are read as integers, clipped to 0..65535; arrays holding them are refused."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise UserError(f"{name}: contains NaN or infinite values")
    if is_float:
        usual = _float_range(lo, hi)
        if usual == (0, 255) and hi <= 2:  # [0, 1] data just past 1, not 0..255 data nearly black
            raise UserError(f"{name}: float values in [{lo:.6g}, {hi:.6g}] are past [0,1] yet "
                            f"would be nearly black read as [0,255]: rescale them to [0,1] "
                            f"(e.g. divide by the largest value)")
        # a whole array of [0, 1] data just below 0, not [-1, 1] data (one bright image may be)
        if usual == (-1, 1) and lo > -0.05 and not image_files:
            raise UserError(f"{name}: float values in [{lo:.6g}, {hi:.6g}] are barely below 0: "
                            f"read as [-1,1] every image would be washed out to light grey; clip "
                            f"them to [0,1] (numpy.clip), or rescale [-1,1] data to [0,1]")
        if usual:
            return ValueScale(*usual)
        if not image_files:
            raise UserError(f"{name}: float values in [{lo:.3g}, {hi:.3g}]; "
                            f"expected [0,1], [-1,1] or [0,255]")
    clipped, largest = "", hi
    if lo < 0 or hi > 65535:
        if not image_files:
            raise UserError(f"{name}: integer values in [{lo}, {hi}]; expected 0..255 or 0..65535")
        clipped, hi = f", clipped from [{lo:.6g}, {hi:.6g}] to 0..65535", min(hi, 65535)
    depth = bit_depth or next(d for d in BIT_DEPTHS if hi < 2 ** d)
    if hi >= 2 ** depth and depth_of:
        raise UserError(f"{name}: values up to {largest:.6g} do not fit the {depth}-bit range of "
                        f"{depth_of}: scale the image to 0..{2 ** depth - 1} first")
    if hi >= 2 ** depth:
        raise UserError(f"{name}: values up to {largest:.6g} do not fit data.bit_depth={depth} "
                        f"(yours, or the one a run recorded): use at least "
                        f"{int(hi).bit_length()} bits, or for a run, start over with --fresh")
    note = f"{depth}-bit values (largest {hi:.6g}{clipped}; data.bit_depth sets the depth)"
    return ValueScale(0, 2 ** depth - 1, depth, note if depth != 8 or clipped else "")


def value_scale(arr: np.ndarray, name: str, bit_depth: int | None = None) -> ValueScale:
    """The scale of an array holding a whole dataset (N x C x H x W, alpha dropped)."""
    if arr.dtype == np.bool_:
        return ValueScale(0, 1)
    if arr.dtype == np.uint8 or arr.size == 0:  # an empty array is refused with its shape
        return ValueScale()
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise UserError(f"{name}: unsupported dtype {arr.dtype}")
    return range_scale(arr.dtype.kind == "f", arr.min().item(), arr.max().item(), name, bit_depth)


def as_nchw(arr: np.ndarray, name: str) -> np.ndarray:
    """(N,H,W), (N,H,W,C) or (N,C,H,W) -> N x C x H x W with C 1 or 3 (alpha dropped); checked."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[1] > 4:
        raise UserError(f"{name}: shape {arr.shape} reads as {arr.shape[0]} gray images "
                        f"{arr.shape[2]} pixels wide, or is one colour image: save a stack of "
                        f"images, (N,H,W) or (N,H,W,C) (one image: array[None])")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        channels_last = arr.shape[-1] in (1, 3, 4) and (  # tiny square images: H == W
            arr.shape[1] not in (1, 3, 4) or arr.shape[1] == arr.shape[2])
        if channels_last:
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


def array_to_uint8_nchw(arr: np.ndarray, name: str,
                        scale: ValueScale | None = None) -> torch.Tensor:
    """An image array in any layout `as_nchw` takes, uint8/uint16/bool/float -> uint8 N x C x H x W.
    `scale` (default: the array's own, `value_scale`) maps its values to 0..255: batches read from
    one file share their file's."""
    arr = as_nchw(arr, name)
    scale = scale if scale is not None else value_scale(arr, name)
    out = np.empty(arr.shape, dtype=np.uint8)  # filled a chunk at a time: float64 copies stay small
    step = max(1, 2**23 // max(1, arr[0].size))
    for i in range(0, len(arr), step):
        out[i:i + step] = scale.apply(arr[i:i + step])
    return torch.from_numpy(out)
