"""Are generated images copies of training images? Nearest neighbours, and a threshold calibrated on
real images the generator never saw.

Distance: 1 - the normalised correlation of two images (pixels centred and scaled per image), the
best over translations of up to `shift` pixels, each compared on the window both images show, so
a copy moved by a pixel is still a copy. A run that trained on mirrored or rotated images
(data.hflip, train.augment) may copy them so: the training images are then searched in those views
too (`seen_views`). For each generated image: its nearest training image, that distance d1, and
d1 / dk, the ratio to the k-th nearest (Carlini et al. 2023: a copy is much closer to one training
image than to the rest).

The same search runs in a feature space too (`nearest_features`: cosine distance between feature
vectors, EfficientNet's or a classifier's), which sees copies that pixels miss (a copy with its
contrast changed) and is blind to others (a mirrored copy of a symmetric feature); the audit
reports both.

A generated image is a near-copy when d1 is below the threshold: the `share` quantile of the same
distance for held-out real images (a split the generator never saw), so that at most `share` of
real, new images would be flagged. Without held-out images, the training images' own leave-one-out
distances stand in for them (each image against all the others). A reference image that is a
training image over again (one saved twice, a held-out image re-encoded from a training one) is
no new image: it is set aside (`duplicates`), as a few of them would pull the quantile to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import torch

from ..config import Config
from ..data import in_chunks, resize_center_crop
from ..errors import UserError
from ..images import to_uint8, upsample

# query and reference images per matrix product: memory stays bounded whatever the set sizes
CHUNK, REF_CHUNK = 256, 1024
REFERENCE_MAX = 2000  # reference images a threshold is calibrated on
REFERENCE_MIN = 20  # fewer give a quantile that is one image's distance, not a false-alarm rate
REDRAWS = 10  # --drop-copies' default: draws of an image after the first that was a near-copy
EXACT = 1e-6  # a distance this small is a copy whatever the threshold: float rounding, not a change
# a reference image this much nearer one training image than to its k-th nearest, and than the
# references' median distance to their k-th nearest (which duplicates leave as it is), is that
# image over again (a light JPEG re-save included), not a new one; looser cuts catch real twins
DUPLICATE_RATIO, DUPLICATE_SCALE = 0.1, 0.04


def _normalised(images_u8: torch.Tensor) -> torch.Tensor:
    """N x C x H x W uint8 -> N x D float32, each row centred and of unit length."""
    x = images_u8.reshape(len(images_u8), -1).float()
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def _overlaps(h: int, w: int, shift: int) -> list[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """For each translation by up to `shift` pixels, the windows of the query and of the
    reference that overlap: a moved copy is compared on what both images show."""
    def window(d: int, n: int) -> tuple[slice, slice]:
        return slice(max(0, d), n + min(0, d)), slice(max(0, -d), n + min(0, -d))

    pairs = []
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            (qy, ry), (qx, rx) = window(dy, h), window(dx, w)
            pairs.append(((qy, qx), (ry, rx)))
    return pairs


View = Callable[[torch.Tensor], torch.Tensor]  # a transform of N x C x H x W images
FLIPS: dict[str, View] = {"hflip": lambda x: x.flip(-1), "vflip": lambda x: x.flip(-2),
                          "rot90": lambda x: x.rot90(1, (-2, -1))}


def seen_views(cfg: Config) -> tuple[str, ...]:
    """The flips, rotations and translations (train.augment's, up to 1/8 of the side, where the
    search otherwise covers a pixel) a run's training images were shown in."""
    ops = [op for op in cfg.train.augment if op in FLIPS or op == "translate"]
    return tuple(sorted({*ops, *(["hflip"] if cfg.data.hflip else [])}))


def _group(ops: tuple[str, ...]) -> list[View]:
    """Every distinct transform that compositions of `ops` make, the identity first."""
    probe = torch.arange(9).reshape(1, 1, 3, 3)  # no symmetry: distinct transforms move it apart
    found: dict[bytes, View] = {probe.numpy().tobytes(): lambda x: x}
    todo = list(found.values())
    while todo:
        view = todo.pop()
        for op in ops:
            def composed(x, view=view, op=op):
                return FLIPS[op](view(x))
            key = composed(probe).numpy().tobytes()
            if key not in found:
                found[key] = composed
                todo.append(composed)
    return list(found.values())


def _similarities(query_u8: torch.Tensor, ref_u8: torch.Tensor, windows: list,
                  views: list[View]) -> torch.Tensor:
    """Q x R: each pair's best normalised correlation over the translations and the reference's
    views."""
    best = None
    for view in views:
        ref = view(ref_u8)
        for (qy, qx), (ry, rx) in windows:
            q, r = query_u8[..., qy, qx], ref[..., ry, rx]
            sims = torch.where(_same_constant(q, r), 1.0, _normalised(q) @ _normalised(r).T)
            best = sims if best is None else torch.maximum(best, sims)
    return best


def _same_constant(query_u8: torch.Tensor, ref_u8: torch.Tensor) -> torch.Tensor:
    """Q x R: both images one value throughout, the same one. A blank image has no correlation
    with anything, yet it copies a blank training image of its value."""
    def flat_value(x):  # each image's value where it is constant, else -1
        x = x.reshape(len(x), -1).int()
        return torch.where(x.amax(1) == x.amin(1), x[:, 0], -1)
    q, r = flat_value(query_u8), flat_value(ref_u8)
    return (q[:, None] == r[None, :]) & (q[:, None] >= 0)


@dataclass
class Neighbours:
    index: np.ndarray  # nearest reference image of each query
    d1: np.ndarray  # its distance
    dk: np.ndarray  # the distance to the k-th nearest

    @property
    def ratio(self) -> np.ndarray:
        return self.d1 / np.maximum(self.dk, 1e-12)


Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # Q queries, R refs -> Q x R


def nearest(query_u8: torch.Tensor, ref_u8: torch.Tensor, k: int = 5, shift: int = 1,
            exclude: torch.Tensor | None = None, views: tuple[str, ...] = ()) -> Neighbours:
    """Nearest reference image of each query image in pixels, the references also seen in
    `views` (FLIPS); `exclude[i]`: a reference image left out for query i (itself, for
    leave-one-out distances within one set)."""
    windows, group = _searched(ref_u8.shape[-2:], shift, views)
    return _search(query_u8, ref_u8, lambda q, r: _similarities(q, r, windows, group), k, exclude)


def _searched(size: tuple[int, int], shift: int, views: tuple[str, ...]) -> tuple[list, list]:
    """The windows and the reference views `nearest` compares in."""
    if "translate" in views:  # as far as train.augment's translations reach (augmentation.py)
        shift = max(shift, size[-1] // 8)
    return _overlaps(*size, shift), _group(tuple(v for v in views if v in FLIPS))


def as_matched(query_u8: torch.Tensor, ref_u8: torch.Tensor,
               views: tuple[str, ...] = ()) -> tuple[torch.Tensor, bool]:
    """One reference image (C x H x W) in the view `nearest` matched the query in, and whether
    that view is another than the image as stored: a mirrored copy is shown mirrored."""
    windows, group = _searched(ref_u8.shape[-2:], 1, views)
    sims = [float(_similarities(query_u8[None], view(ref_u8[None]), windows, [lambda x: x]))
            for view in group]
    best = int(np.argmax(sims))
    return group[best](ref_u8[None])[0], best != 0


def nearest_features(query: torch.Tensor, ref: torch.Tensor, k: int = 5,
                     exclude: torch.Tensor | None = None) -> Neighbours:
    """Nearest reference of each query by cosine distance between feature vectors (N x D)."""
    def unit(x):
        return x.float() / x.float().norm(dim=1, keepdim=True).clamp_min(1e-12)
    return _search(query, ref, lambda q, r: unit(q) @ unit(r).T, k, exclude)


def _search(query: torch.Tensor, ref: torch.Tensor, similarity: Similarity, k: int,
            exclude: torch.Tensor | None) -> Neighbours:
    """Distance 1 - similarity to the nearest and the k-th nearest reference, chunked over both
    sets so memory stays bounded."""
    k = min(k, len(ref) - (exclude is not None))
    index, d1, dk = [], [], []
    for start in range(0, len(query), CHUNK):
        part = query[start:start + CHUNK]
        sims = torch.cat([similarity(part, ref[r:r + REF_CHUNK])
                          for r in range(0, len(ref), REF_CHUNK)], dim=1)
        if exclude is not None:
            sims[torch.arange(len(part)), exclude[start:start + CHUNK]] = -np.inf
        top = sims.topk(k, dim=1)
        index.append(top.indices[:, 0])
        d1.append(1 - top.values[:, 0])
        dk.append(1 - top.values[:, -1])
    d1, dk = torch.cat(d1).clamp_min(0).numpy(), torch.cat(dk).clamp_min(0).numpy()
    return Neighbours(torch.cat(index).numpy(), d1, dk)


def threshold(reference_d1: np.ndarray, share: float) -> float:
    """The distance a new real image falls below with probability at most `share`: the j-th
    smallest of the n reference distances, j = floor(share (n + 1)), since a new image is as
    likely to rank anywhere among n + 1. Where j would be 0, the smallest (`Calibration.warn`)."""
    rank = max(1, math.floor(share * (len(reference_d1) + 1) + 1e-9))
    return float(np.partition(reference_d1, rank - 1)[rank - 1])


def as_sampled(images: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """Real images as the generated ones of `size` are compared. Larger: taken up to `size` as
    `sample --size` takes a sample (bicubic), then down again as the audit takes the generated ones,
    so an upsampled copy of a training image matches it exactly, where the two resizes alone would
    blur it past the threshold. Smaller: taken down to `size`, rather than blurring the generated
    images up to the run's."""
    if images is None or images.shape[-1] == size:
        return images
    if images.shape[-1] > size:
        return resize_center_crop(images, size)
    return in_chunks(lambda part: resize_center_crop(
        to_uint8(upsample(part.float() / 127.5 - 1, size)), part.shape[-1]), images,
        images.shape[1] * size * size)


Search = Callable[..., Neighbours]  # nearest or nearest_features


@dataclass
class Calibration:
    threshold: float
    on: str  # "held-out" or "leave-one-out"
    reference_d1: np.ndarray  # the distances the threshold is the quantile of
    set_aside: int  # reference images that were duplicates of a training image
    share: float = 0.01  # of new real images the threshold would flag
    aside_rows: np.ndarray | None = None  # which reference images were set aside

    def summary(self) -> dict:
        """The threshold as the JSON outputs record it."""
        return {"threshold": self.threshold, "calibrated_on": self.on,
                "duplicates_set_aside": self.set_aside}

    def warn(self, prefix: str, log, remedy: str = "give more held-out images (--holdout)") -> None:
        """Tell the user what to know of the threshold: calibration images set aside as duplicates,
        and a share finer than the calibration images can resolve (and the command's `remedy`)."""
        n = len(self.reference_d1)
        if self.share * (n + 1) < 1:
            log(f"{prefix}: warning: a share of {self.share:g} of {n} calibration images is less "
                f"than one: the threshold is their smallest distance, so about 1/{n + 1} "
                f"({1 / (n + 1):.1%}) of new real images would be flagged, not {self.share:.1%}; "
                f"{remedy}")
        if not self.set_aside:
            return
        if self.on == "held-out":
            log(f"{prefix}: warning: {self.set_aside} held-out image(s) are a training image over "
                f"again (re-encoded or resized?): set aside from the copy threshold's "
                f"calibration; hold out only images the run never trained on")
        else:
            log(f"{prefix}: warning: {self.set_aside} training image(s) are another one over "
                f"again (an image saved twice?): set aside from the copy threshold's "
                f"calibration; check the data for repeated images")


def duplicates(found: Neighbours) -> np.ndarray:
    """Reference images that are a training image over again: exact copies, and those much nearer
    it than to the rest of the training set (d1 / dk) and than images are to their k-th nearest
    (the median dk)."""
    near = (found.ratio < DUPLICATE_RATIO) & (found.d1 < DUPLICATE_SCALE * np.median(found.dk))
    return near | (found.d1 <= EXACT)


def calibrate(train: torch.Tensor, holdout: torch.Tensor | None, share: float = 0.01,
              search: Search = nearest, aside_rows: np.ndarray | None = None) -> Calibration:
    """The threshold from held-out images against the training set, or from the training set's
    leave-one-out distances, duplicates set aside; at most REFERENCE_MAX reference images (a fixed
    random subset), plenty for a 1% quantile. `aside_rows`: the duplicates as another view of the
    same images found them (pixels are where an image is "the same"; in a feature space distinct
    images of one class can be as close)."""
    reference, exclude = (holdout, False) if holdout is not None else (train, True)
    if exclude and len(train) < REFERENCE_MIN:
        raise UserError(f"{len(train)} training image(s) are too few to calibrate a copy "
                        f"threshold on their leave-one-out distances (at least {REFERENCE_MIN}): "
                        f"give at least {REFERENCE_MIN} held-out real images (--holdout)")
    rows = torch.arange(len(reference))
    if len(reference) > REFERENCE_MAX:
        rows = torch.randperm(len(reference), generator=torch.Generator().manual_seed(0))
        rows = rows[:REFERENCE_MAX].sort().values
    # leave-one-out: each reference image against every training image but itself
    found = search(reference[rows], train, exclude=rows if exclude else None)
    aside = duplicates(found) if aside_rows is None else np.isin(rows.numpy(), aside_rows)
    new, on = found.d1[~aside], "leave-one-out" if exclude else "held-out"
    if len(new) < REFERENCE_MIN:
        raise UserError(f"after setting aside {int(aside.sum())} {'training' if exclude else on} "
                        f"images that are a training image over again, {len(new)} are left to "
                        f"calibrate the copy threshold on (at least {REFERENCE_MIN}): give more "
                        f"held-out real images the run never trained on (--holdout)")
    return Calibration(threshold(new, share), on, new, int(aside.sum()), share,
                       rows.numpy()[aside])


@dataclass
class Audit:
    neighbours: Neighbours  # of each generated image among the training images
    calibration: Calibration
    copies: np.ndarray  # bool per generated image: closer than the threshold

    @property
    def copy_rate(self) -> float:
        return float(self.copies.mean()) if len(self.copies) else 0.0


def audit(gen: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor | None = None,
          share: float = 0.01, search: Search = nearest,
          aside_rows: np.ndarray | None = None) -> Audit:
    """Each generated image against the training set, with the threshold calibrated on held-out
    real images (or, without them, on the training set's leave-one-out distances). Images are
    uint8 pixels for `nearest`, feature vectors for `nearest_features`."""
    cal = calibrate(train, holdout, share, search, aside_rows)
    found = search(gen, train)
    return Audit(found, cal, is_copy(found.d1, cal.threshold))


def is_copy(d1: np.ndarray, limit: float) -> np.ndarray:
    """Strictly closer than the threshold, and exact copies (the threshold is 0, or float rounding
    above it, where the training set holds exact duplicates): ties at 0 do not make every real
    image a copy, and an exact copy is one whatever its rounding."""
    return (d1 < limit) | (d1 <= EXACT)


@dataclass
class CopyFilter:
    """What `--drop-copies` needs: the training images and a calibrated threshold. A generated
    image closer than it is drawn again with new noise, at most `redraws` times."""
    train: torch.Tensor  # as_sampled at written_at
    calibration: Calibration
    redraws: int = REDRAWS
    views: tuple[str, ...] = ()  # seen_views of the run
    written_at: int | None = None  # sample --size

    @classmethod
    def calibrated(cls, train_u8: torch.Tensor, holdout_u8: torch.Tensor | None = None,
                   share: float = 0.01, redraws: int = REDRAWS, views: tuple[str, ...] = (),
                   written_at: int | None = None) -> CopyFilter:
        """The threshold as `ddpmkit audit` will calibrate it on the images written."""
        train_u8 = as_sampled(train_u8, written_at or train_u8.shape[-1])
        holdout_u8 = as_sampled(holdout_u8, written_at or train_u8.shape[-1])
        cal = calibrate(train_u8, holdout_u8, share, partial(nearest, views=views))
        return cls(train_u8, cal, redraws, views, written_at)

    def compared(self, x: torch.Tensor) -> torch.Tensor:
        """Samples ([-1, 1]) as the audit reads them back: written at --size, then taken to the
        run's size again."""
        if not self.written_at:
            return to_uint8(x)
        return resize_center_crop(to_uint8(upsample(x, self.written_at)), x.shape[-1])

    def distances(self, images_u8: torch.Tensor) -> np.ndarray:
        return nearest(images_u8, self.train, k=1, views=self.views).d1
