"""Which generated images `balance --select` keeps: those a classifier of the real data recognises
as the class they were asked to be.

The selector is metrics/classifier.py's network, trained on the run's real training images with
every class drawn equally often (so a rare class is not scored down for being rare). A candidate's
score is its probability of the class it was generated for. A class's threshold is, with a
validation split of the run's data, the `quantile` (0.05) of the same score over that split's real
images of the class: a kept candidate looks at least as much like its class as 95% of real ones do.
Without a split it is 0.5 (the selector's vote), and `threshold` sets one for every class.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .config import DataConfig, parse_override
from .data import VALIDATION_FOLDERS, image_digests, load_images, named_splits
from .errors import UserError
from .metrics.classifier import cached_fit, predict
from .metrics.evaluate import cache_dir
from .run import RunDir

RECIPE = {"steps": 1500, "batch": 64, "lr": 2e-3, "seed": 0}
NO_SPLIT_THRESHOLD = 0.5
WEAK_THRESHOLD = 0.05  # below this, a quantile threshold keeps nearly any candidate


@dataclass(frozen=True)
class SelectOptions:
    """What `balance --select` was asked: the thresholds' rule and the candidates' limit."""
    quantile: float = 0.05
    threshold: float | None = None  # one threshold for every class instead of the quantile rule
    max_candidates: float = 4.0  # candidates a class may take, times the images it needs
    validation: str | None = None  # labelled real images for the thresholds (RunDir.other_data)

    def check(self) -> SelectOptions:
        if not 0 <= self.quantile < 1:
            raise UserError(f"--select-quantile {self.quantile}: the share of a class's real "
                            f"validation images a kept candidate may score below, in [0, 1), "
                            f"e.g. 0.05")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise UserError(f"--select-threshold {self.threshold}: a probability in (0, 1), "
                            f"e.g. 0.5")
        if not 1 <= self.max_candidates < math.inf:
            raise UserError(f"--max-candidates {self.max_candidates}: at least 1 (the images a "
                            f"class needs, times this, is what it may generate)")
        return self


@dataclass
class Selector:
    net: torch.nn.Module
    names: list[str]
    thresholds: dict[str, float]
    calibrated_on: str
    real_pass: dict[str, float]  # share of each class's real images (val, else training) passing
    real_fidelity: dict[str, float]  # share of them the selector assigns to their class
    tuned_on: frozenset[str] = frozenset()  # digests of the real images that set the thresholds

    def scores(self, images_u8: torch.Tensor, class_name: str) -> np.ndarray:
        """Each image's probability of `class_name`."""
        return predict(self.net, images_u8)[:, self.names.index(class_name)]

    def fidelity(self, images_u8: torch.Tensor, class_name: str) -> tuple[float, float]:
        """The share of the images the selector assigns to `class_name` (its class fidelity), and
        the share passing the class's threshold."""
        return _shares(predict(self.net, images_u8), self.names.index(class_name),
                       self.thresholds[class_name])

    def digest(self, class_name: str) -> str:
        """Equal digests score every image of `class_name` alike and pass the same ones."""
        h = hashlib.sha256(f"{class_name} {self.thresholds[class_name]!r}".encode())
        for tensor in self.net.state_dict().values():
            h.update(tensor.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> str:
        return ", ".join(f"{c} {t:.10g}" for c, t in self.thresholds.items())


def _shares(probs: np.ndarray, i: int, threshold: float) -> tuple[float, float]:
    """Of images with these class probabilities: the share assigned to class i, and the share
    whose probability of it reaches the threshold."""
    return float((probs.argmax(1) == i).mean()), float((probs[:, i] >= threshold).mean())


def train_selector(images_u8: torch.Tensor, labels: list[str], names: list[str],
                   log=print) -> torch.nn.Module:
    """The selector of these images, trained once and then loaded from the cache of classifiers."""
    y = np.array([names.index(label) for label in labels])
    counts = np.bincount(y, minlength=len(names)).astype(np.float64)
    return cached_fit(cache_dir(), images_u8, y, len(names),
                      weights=torch.from_numpy(1.0 / counts[y]), shifts=True, flips=False,
                      **RECIPE, log=log,
                      announce=f"select: training the selector on {len(y)} real images "
                               f"({len(names)} classes, each drawn equally often, "
                               f"{RECIPE['steps']} steps; cached for next time)")


def thresholds(names: list[str], val: tuple[np.ndarray, list[str]] | None, quantile: float,
               fixed: float | None) -> tuple[dict[str, float], str]:
    """Each class's threshold from the selector's probabilities of the validation images (with
    their labels), and what it was chosen on."""
    if fixed is not None:
        return {c: fixed for c in names}, f"--select-threshold {fixed}"
    if val is None:
        return ({c: NO_SPLIT_THRESHOLD for c in names},
                f"no validation split: {NO_SPLIT_THRESHOLD} for every class; --select-val DATA "
                f"sets them on labelled images the generator never saw")
    probs, labels = val
    out = {}
    for i, c in enumerate(names):
        own = probs[[label == c for label in labels], i]
        # the lower order statistic: at least 1 - quantile of the class's real images reach it
        # however few there are (interpolation puts it above the smallest of a handful)
        out[c] = (float(np.quantile(own, quantile, method="lower")) if len(own)
                  else NO_SPLIT_THRESHOLD)
    missing = [c for c in names if c not in labels]
    return out, (f"the {quantile:g} quantile of the validation split's own images ({len(labels)})"
                 + (f"; {NO_SPLIT_THRESHOLD} for {', '.join(missing)}, which it has none of"
                    if missing else ""))


def build_selector(data_cfg: DataConfig, images_u8: torch.Tensor, labels: list[str],
                   names: list[str], options: SelectOptions, log=print, *,
                   val: tuple[torch.Tensor, list[str]] | None = None) -> Selector:
    """The selector for a run: trained on its training images, thresholds from `val` (labelled
    real images: `validation_images`), else from its data's validation split where it has one."""
    net = train_selector(images_u8, labels, names, log)
    if val is None and options.threshold is None:
        val = _validation_split(data_cfg, images_u8, log)
    real_images, real_labels = val or (images_u8, labels)
    probs = predict(net, real_images)
    limits, how = thresholds(names, (probs, real_labels) if val else None, options.quantile,
                             options.threshold)
    # a class without validation images: its real shares are measured on its training images
    trained = predict(net, images_u8) if any(c not in real_labels for c in names) else None
    real = {}
    for i, c in enumerate(names):
        own = (probs[[label == c for label in real_labels]] if c in real_labels
               else trained[[label == c for label in labels]])
        real[c] = _shares(own, i, limits[c]) if len(own) else (1.0, 1.0)
    selector = Selector(net, names, limits, how, {c: p for c, (_, p) in real.items()},
                        {c: f for c, (f, _) in real.items()},
                        frozenset(image_digests(real_images)) if val and options.threshold is None
                        else frozenset())
    log(f"select: thresholds {selector.describe()} ({how})")
    quantile_rule = val is not None and options.threshold is None
    for c in [c for c in names if quantile_rule and limits[c] < WEAK_THRESHOLD]:
        log(f"select: warning: the selector gives some real {c} images almost no chance of being "
            f"{c}, so a threshold of {limits[c]:.2g} also passes candidates it does not see as "
            f"{c}; --select-threshold 0.5 keeps only those it calls {c}")
    return selector


def _validation_split(data_cfg: DataConfig, train_u8: torch.Tensor,
                      log) -> tuple[torch.Tensor, list[str]] | None:
    """The data's val split, less any training images in it: the selector has learnt those, so
    they would set the thresholds too high."""
    held = (named_splits(data_cfg.path) or set()) if data_cfg.path else set()
    split = next((name for name in VALIDATION_FOLDERS if name in held), None)
    if split is None:
        return None  # the thresholds then say there was none, and what sets them instead
    try:
        data = load_images(replace(data_cfg, split=split), log=lambda *_: None)
    except UserError as exc:  # the source has splits, but no val split
        log(f"select: no validation split ({exc})")
        return None
    trained = set(image_digests(train_u8))
    keep = [d not in trained for d in image_digests(data.images)]
    if not all(keep):
        log(f"select: the validation split holds {keep.count(False)} training image(s): left out")
    if not data.labels or not any(keep):
        return None
    return data.images[torch.tensor(keep)], [c for c, k in zip(data.labels, keep) if k]


def validation_images(run: RunDir, where: str, names: list[str],
                      log=print) -> tuple[torch.Tensor, list[str]]:
    """--select-val: labelled real images for the thresholds (`RunDir.other_data`). Training
    images among them are left out: the selector has learnt those, so they would set the
    thresholds too high."""
    data = run.other_data(where, "--select-val", log)
    if not data.labels or any(label is None for label in data.labels):
        raise UserError(f"--select-val {where}: its images have no labels, and each class has its "
                        f"own threshold: give labelled images (data.labels=CSV, class subfolders, "
                        f"or an .npz with *_labels or y)")
    known = torch.tensor([label in names for label in data.labels], dtype=torch.bool)
    keep = known & run.unseen(data.images)
    if known.any() and not keep.any():
        raise UserError(f"--select-val {where}: all {int(known.sum())} of its images of the run's "
                        f"classes are training images of the run; give images it never saw "
                        f"(a val split: data.split=val)")
    if not keep.any():
        found = ", ".join(sorted(set(data.labels))[:3])
        raise UserError(f"--select-val {where}: none of its images is both a class of the run "
                        f"({', '.join(names)}) and not a training image (its labels: {found})")
    others = sorted({label for label, k in zip(data.labels, known.tolist()) if not k})
    if "=" in where and parse_override(where) == ("data.split", "test"):
        log(f"select: warning: --select-val {where} tunes the selection on the test split; a "
            f"downstream study testing on it would then report a tuned figure: use data.split=val")
    log(f"select: validation images from {where}: {int(keep.sum())} of {len(keep)} "
        f"({int((known & ~keep).sum())} training images, {int((~known).sum())} of other classes "
        f"left out{': ' + ', '.join(others[:5]) if others else ''})")
    return data.images[keep], [label for label, k in zip(data.labels, keep.tolist()) if k]


CLOSE_TO_REAL = 0.9  # a scale whose fidelity is this share of the real images' is enough


def auto_scale(fidelity: dict[float, float], real_fidelity: float) -> float:
    """--class-guidance auto: the smallest scale whose probe candidates the selector assigns to
    their class at least nine tenths as often as it does the class's real images (more guidance
    costs diversity); where none does, the scale with the highest fidelity. Fidelity, not the pass
    rate: a class the selector barely recognises has a threshold near 0 that every scale passes."""
    enough = [scale for scale, rate in sorted(fidelity.items())
              if rate >= CLOSE_TO_REAL * real_fidelity]
    return enough[0] if enough else max(fidelity, key=lambda s: (fidelity[s], -s))


def next_count(made: int, kept: int, need: int, limit: int) -> int:
    """How many candidates to have next: enough, at the acceptance rate so far (and a tenth more),
    to reach `need` kept ones; never more than `limit`."""
    rate = max(kept, 1) / made
    return min(limit, made + max(1, int(np.ceil(1.1 * (need - kept) / rate))))
