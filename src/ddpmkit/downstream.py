"""`ddpmkit downstream`: do the synthetic images help a classifier? The study, measured honestly.

On a real test split that no generator saw, the same small ResNet is trained with the same recipe
(optimizer steps, batch size, augmentation) on three training sets (four with a `balance
--select` output), for several seeds each:
  (a) real:         the real training images, drawn uniformly;
  (b) real+synth:   the real images plus a `ddpmkit balance` output's synthetic ones, uniformly
                    or with a chosen synthetic share of the topped-up classes' draws;
  (c) oversampled:  the real images drawn class-balanced (oversampling the rare classes): the
                    classic baseline any reviewer asks for;
  (d) real+selected: as (b), with only the candidates `--select` kept; the verdict is then its.
Augmentation (random shifts and flips, on by default) is part of the recipe, so it is the same in
every arm: the arms differ only in their data, and a gain can be credited to the synthetic images.
Reported per arm: accuracy, balanced accuracy, per-class recall, macro-F1 and AUROC as mean and
std over seeds, a paired t-test of balanced accuracy (same seeds) of (b) against (a) and (c), and a
verdict that says "no improvement" unless (b), or (d), beats both by more than the seed-to-seed
spread.

Balanced accuracy at the default threshold rewards a classifier for where its threshold lands as
much as for what it has learnt: training on a balanced mix moves the operating point. With a
calibration split, each classifier is also scored at the per-class thresholds (offsets added to its
log-probabilities; with two classes, one threshold on P(class 1)) that maximise its balanced
accuracy there, and the verdict says whether the gain survives that tuning. The real data's val
split is that calibration split unless another is named.

Leakage guard: the synthetic set names the run that generated it (its sampling jobs record the
run); the study reads that run's record of its training images (or loads its training data again)
and refuses to go on if any test image is among them.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import atomic
from .config import DataConfig
from .data import (class_order, has_named_splits, image_digests, load_images, named_splits,
                   resize_center_crop)
from .errors import UserError
from .metrics.classifier import fit, predict
from .metrics.memorization import as_sampled, audit, is_copy, nearest, seen_views
from .outputs import (RECORD, Kind, OutputFolder, existing, is_index, job_identities, job_runs,
                      manifest_images, read_manifest, read_record, refuse_special,
                      refuse_unfinished)
from .limits import check_memory
from .pixels import declared_bytes, read_image
from .run import RunDir, recorded_bit_depth

TUNED = "balanced_accuracy@tuned"  # at the threshold tuned on the calibration split


@dataclass
class Pool:
    images: torch.Tensor  # uint8 N x C x H x W
    labels: np.ndarray  # class index per image
    synthetic: np.ndarray | None = None  # per image: generated? (None: all real)
    source: str = ""  # what was read, for the study's record

    @cached_property
    def digests(self) -> list[str]:
        """Each image's sha256 (identity at the study's size), hashed once for every check."""
        return image_digests(self.images)


def combine(real: Pool, synthetic: Pool) -> Pool:
    return Pool(torch.cat([real.images, synthetic.images]),
                np.concatenate([real.labels, synthetic.labels]),
                np.concatenate([np.zeros(len(real.labels), bool),
                                np.ones(len(synthetic.labels), bool)]))


def draw_weights(pool: Pool, arm: str, classes: int,
                 synthetic_share: float | None = None) -> torch.Tensor:
    """How often each training image is drawn. oversampled: every class equally often. An arm
    with generated images and a synthetic_share: each class keeps its share of the pool, and within
    a class that has generated images they make that fraction of its draws (the real ones the
    rest). Otherwise uniform."""
    counts = np.bincount(pool.labels, minlength=classes).astype(np.float64)
    if arm == "oversampled":
        return torch.from_numpy(1.0 / counts[pool.labels])
    if synthetic_share is None or pool.synthetic is None:
        return torch.ones(len(pool.labels), dtype=torch.float64)
    synth = np.bincount(pool.labels[pool.synthetic], minlength=classes).astype(np.float64)
    real = counts - synth
    has_synth = (synth > 0)[pool.labels] & (real > 0)[pool.labels]
    share = np.where(pool.synthetic, synthetic_share / np.maximum(synth, 1)[pool.labels],
                     (1 - synthetic_share) / np.maximum(real, 1)[pool.labels])
    weights = np.where(has_synth, share * counts[pool.labels], 1.0)  # class mass: count, as uniform
    return torch.from_numpy(weights)


# --- data --------------------------------------------------------------------------------------

def as_source(source: str | DataConfig | None) -> DataConfig | None:
    """A real-data source: a path, or a data section (a folder with its labels CSV and columns)."""
    return DataConfig(path=source) if isinstance(source, str) else source


def _named(source: DataConfig, split: str) -> str:
    if source.labels is not None:
        return f"{source.path} (labelled by {source.labels})"
    return f"{source.path} ({split})" if _has_splits(source) else str(source.path)


def _every_class(pool: Pool, names: list[str], what: str) -> None:
    """Refused if a class has no images in `pool`: each class is scored (and tuned) alike."""
    missing = [n for i, n in enumerate(names) if not (pool.labels == i).any()]
    if missing:
        raise UserError(f"{what}: no images of class {', '.join(missing[:3])}; the study "
                        f"scores every class of the real data ({', '.join(names)}): give labelled "
                        f"images of each")


def load_real(source: str | DataConfig, split: str, size: int, channels: int | None,
              names: list[str]) -> Pool:
    source = as_source(source)
    data = load_images(replace(source, split=split, image_size=size, channels=channels))
    if not data.labels:
        raise UserError(f"{_named(source, split)}: no labels; "
                        f"the study needs labelled real images (class subfolders, an .npz with "
                        f"*_labels or y, or a CSV: --real-labels, --test-labels)")
    where = replace(source, path=str(Path(source.path).expanduser().resolve()))
    return Pool(data.images, _indices(data.labels, names, _named(source, split)),
                source=_named(where, split))


def load_synthetic(folder: Path, names: list[str]) -> tuple[Pool, list[Path]]:
    """The synthetic rows of a balance (or sample) manifest -> images (at the size they were
    written, which the study runs at), labels, and the runs that made them."""
    manifest, balanced = folder / "manifest.csv", folder.resolve().parent.parent
    if (folder.resolve().parent.name == "classes"
            and (read_record(balanced) or {}).get("kind") == "balance"):
        raise UserError(f"{folder} holds one class's candidates of the balanced set {balanced}: "
                        f"give {balanced}, whose manifest.csv lists the images it kept")
    refuse_unfinished(folder)
    if not manifest.is_file():
        raise UserError(f"{folder} has no manifest.csv: "
                        f"pass a `ddpmkit balance` (or `sample`) output folder")
    rows = manifest_images(folder, "file")
    if not rows:
        raise UserError(f"{manifest} lists no synthetic images")
    twice = next((path for path, n in Counter(p for p, _ in rows).items() if n > 1), None)
    if twice is not None:  # counted twice, it would weigh twice in every synthetic arm
        raise UserError(f"{manifest} lists {twice} more than once: a manifest ddpmkit wrote "
                        f"lists each image once; balance again")
    images = _of_one_size([path for path, _ in rows], manifest)
    labels = _indices([row["label"] for _, row in rows], names, str(manifest))
    return Pool(images, labels, source=str(folder.resolve())), job_runs(folder)


def _of_one_size(paths: list[Path], listed_in: Path) -> torch.Tensor:
    """The images a manifest lists, which a balance output writes at the generator's one square
    size, the size the study runs at."""
    check_memory(2 * sum(map(declared_bytes, paths)), f"decoding the images {listed_in} lists",
                 "study the balance output written at the generator's size (without sample.size)")
    images = [read_image(path) for path in paths]
    sizes = sorted({tuple(img.shape[-2:]) for img in images})
    if len(sizes) > 1 or sizes[0][0] != sizes[0][1]:
        shown = ", ".join(f"{w}x{h}" for h, w in sizes[:3])
        raise UserError(f"{listed_in} lists images of {shown}: the study runs at the "
                        f"generator's one square size; give the balance output as ddpmkit "
                        f"wrote it")
    return torch.stack(images)


def load_unselected(folder: Path, size: int, names: list[str], kept: Pool) -> Pool | None:
    """For a `balance --select` output (its selection.csv), as many candidates of each class as
    were kept, the first in index order (what balance without --select makes); else None."""
    rows = manifest_images(folder, "file", name="selection.csv")
    if not rows:
        return None
    if any(not is_index(row.get("index", "")) or row.get("class") not in names for _, row in rows):
        raise UserError(f"{folder / 'selection.csv'} is not a selection record ddpmkit wrote: "
                        f"every row needs a class of the study and an index")
    counts, chosen = np.bincount(kept.labels, minlength=len(names)), []
    for i, name in enumerate(names):
        mine = sorted((int(row["index"]), path) for path, row in rows if row["class"] == name)
        chosen += [(path, i) for _, path in mine[:counts[i]]]
    images = _of_one_size([path for path, _ in chosen], folder / "selection.csv")
    return Pool(resize_center_crop(images, size), np.array([i for _, i in chosen]))


def _indices(labels: list[str], names: list[str], what: str) -> np.ndarray:
    unknown = sorted(set(labels) - set(names))
    if "" in unknown:  # an unconditional run's samples name no class
        raise UserError(f"{what}: some images have no class label: the study needs each "
                        f"synthetic image's class (a balance output of a class-conditional run)")
    if unknown:
        raise UserError(f"{what}: labels {', '.join(unknown[:5])} are not among the classes "
                        f"{', '.join(names)}")
    return np.array([names.index(label) for label in labels])


@dataclass
class TrainedOn:
    """What the generators, and the runs they were fine-tuned from, trained on."""
    digests: set[str]
    sources: list[Path]  # runs they were fine-tuned from, whose images are among `digests`
    unchecked: list[str]  # other starting points: their images are unknown or cannot be read


def generators_training_digests(runs: list[Path], size: int, channels: int,
                                verified: bool = True) -> TrainedOn:
    """The digests of every image these runs (and the ddpmkit runs they were fine-tuned from)
    trained on, as the study reads real images."""
    known, unchecked = _sources(runs, verified)
    seen = set().union(*(_training_digests(run, size, channels) for run in runs))
    sources = []
    for source in known:
        try:
            seen |= _training_digests(source, size, channels)
            sources.append(source)
        except UserError:  # a starting point's data moved away: said, not a reason to stop
            unchecked.append(f"{source} (its training data cannot be read)")
    return TrainedOn(seen, sources, unchecked)


def _training_digests(run: Path, size: int, channels: int) -> set[str]:
    """At the study's size and channels, resampled once from the source: a run's own record where
    it is at those; otherwise its training data read again from its config, straight to the
    study's size (a record at the run's size, resampled again, would match no test image)."""
    if not RunDir(run).config_path.is_file():
        raise UserError(f"the synthetic images were made by {run}, which is no longer there: "
                        f"the leakage check reads its training data, so put the run back "
                        f"(or regenerate the set)")
    if RunDir(run).imported_from():
        raise UserError(f"the synthetic images come from {run}, an imported model: "
                        f"the images it was trained on are unknown, "
                        f"so leakage into the test split cannot be ruled out")
    cfg = RunDir(run).config()
    recorded = RunDir(run).recorded_digests()
    if recorded and cfg.data.image_size == size and cfg.model.in_channels == channels:
        return recorded
    as_study = replace(cfg.data, image_size=size, channels=channels)
    return set(image_digests(load_images(as_study).images))


def _sources(runs: list[Path], verified: bool = True) -> tuple[list[Path], list[str]]:
    """The weights these runs were fine-tuned from (train.init_from), followed back: the ddpmkit
    runs, whose training images are known, and the other sources, whose are not. A ddpmkit run a
    generator was fine-tuned from must still hold the checkpoint it started from (its meta.json
    names it); moved or trained again, it is refused, or with `verified` off, left unchecked."""
    known: list[Path] = []
    unknown: list[str] = []
    todo = [Path(r) for r in runs]
    while todo:
        run = RunDir(todo.pop())
        source = run.config().train.init_from if run.config_path.is_file() else None
        if not source or Path(source) in known or source in unknown:
            continue
        started = re.search(r" step \d+ \(([0-9a-f]{12})\)$", str(run.meta().get("init_from")))
        if not started:  # a diffusers model or hub id: its training images are unknown
            unknown.append(source)
        elif started[1] not in _checkpoint_digests(RunDir(source)):
            if verified:
                raise UserError(f"{run.path} was fine-tuned from {source} (checkpoint "
                                f"{started[1]}), which is no longer there as it was: the leakage "
                                f"check reads its training images, so put that run back (or "
                                f"pass --unverified)")
            unknown.append(f"{source} (no longer the run fine-tuned from)")
        else:
            known.append(Path(source))
            todo.append(Path(source))
    return known, unknown


def _checkpoint_digests(run: RunDir) -> set[str]:
    """The short digests (as meta.json's init_from names them) of the run's checkpoints."""
    return {e["sha256"][:12] for e in run.read_state()["checkpoints"]} if run.is_run() else set()


def refuse_real_among_synthetic(synth: Pool, *pools: tuple[Pool | None, str]) -> None:
    """Test or calibration images put among the synthetic ones: a classifier would train on the
    images it is scored or tuned on."""
    made = set(synth.digests)
    for pool, what in pools:
        found = 0 if pool is None else int(among(pool, made).sum())
        if found:
            raise UserError(f"{found} of the {what} images are among the synthetic images of "
                            f"{synth.source}, which every synthetic arm trains on: take them out "
                            f"of its manifest.csv, or balance again")


def selection_tuned_on(synthetic: Path) -> tuple[set[str], int | None]:
    """The digests of the real images that set a `balance --select` output's thresholds, and the
    size they were taken at (the generator's, which the output may have been written above)."""
    try:
        record = atomic.read_json(synthetic / "selection.json")
        tuned, size = record.get("tuned_on_sha256") or [], record.get("tuned_on_size")
    except (OSError, ValueError, AttributeError):
        return set(), None  # no selection, or none ddpmkit wrote
    if not isinstance(tuned, list) or not all(isinstance(d, str) for d in tuned):
        raise UserError(f"{synthetic}/selection.json: tuned_on_sha256 is not a list of digests, so "
                        f"not a record balance wrote: balance again")
    if tuned and type(size) is not int:
        raise UserError(f"{synthetic}/selection.json was written by an earlier ddpmkit and does "
                        f"not say at what size its thresholds' images were recorded: balance again")
    return set(tuned), size


def tuned_on(test: Pool, source: tuple[DataConfig, str], synthetic: Path,
             names: list[str]) -> np.ndarray:
    """Per test image: did it set a `balance --select` output's thresholds? Compared at the size
    the selection recorded them at, reading the test split again there when the study's differs
    (a recorded image resampled to another size would match no test image)."""
    digests, size = selection_tuned_on(synthetic)
    if not digests or size == test.images.shape[-1]:
        return among(test, digests)
    return among(load_real(*source, size, test.images.shape[1], names), digests)


def refuse_selection_tuned_on(tuned: np.ndarray, synthetic: Path, split: str) -> None:
    """Test images that set a `balance --select` output's thresholds (its selection.json): the
    selected arm would be scored on the images it was tuned on."""
    if tuned.any():
        raise UserError(f"{int(tuned.sum())} of the {split} images set the thresholds that "
                        f"selected {synthetic}'s images (its selection.json): test on other "
                        f"images, or balance again with --select-val on a validation split")


def _drop_seen(pool: Pool, split: str, trained: set[str], real: set[str], synthetic: set[str],
               tuned: np.ndarray) -> tuple[Pool, str]:
    """For choosing on a validation split: its images the generator saw, the classifiers train
    on, or that sit among the synthetic ones, dropped and counted; those that tuned the selection
    are kept (the split that sets the thresholds is the one choices are made on) and counted."""
    seen, in_real = among(pool, trained), among(pool, real)
    in_synth = among(pool, synthetic) & ~seen & ~in_real
    kept = _without(pool, seen | in_real | in_synth)
    tuned_kept = int((tuned & ~(seen | in_real | in_synth)).sum())
    note = (f"{int(seen.sum())} {split} images the generator saw were dropped; "
            + (f"{int((in_real & ~seen).sum())} more that the classifiers train on; "
               if (in_real & ~seen).any() else "")
            + (f"{int(in_synth.sum())} more that are among the synthetic images; "
               if in_synth.any() else "")
            + (f"{tuned_kept} of those kept set the selection's thresholds, which favours "
               f"selected sets here; " if tuned_kept else ""))
    return kept, note


def among(pool: Pool, digests: set[str]) -> np.ndarray:
    """Per image of the pool: is it (byte for byte) one of these?"""
    return np.array([d in digests for d in pool.digests], dtype=bool)


def check_no_leakage(test: Pool, runs: list[Path], trained: TrainedOn, verified: bool,
                     split: str = "test") -> str:
    """Refuse when a test image (of `split`) is among the training images of a run that made the
    synthetic set."""
    if not runs:
        if verified:
            raise UserError(f"the synthetic images do not say which run made them "
                            f"(no {RECORD}), so leakage cannot be ruled out; "
                            "pass --unverified to run the study anyway (reported)")
        return "not checked (--unverified): the synthetic set does not name its generator"
    overlap = int(among(test, trained.digests).sum())
    if overlap:
        raise UserError(f"leakage: the generator {', '.join(map(str, runs))} (or a run it was "
                        f"fine-tuned from) was trained on {overlap} of the {split} images, which "
                        f"the study tests on: choose test images it never saw (another --test "
                        f"or --test-split), or retrain it without them")
    checked = (f"checked: no {split} image is among the training images of "
               f"{', '.join(str(r) for r in runs)}"
               + (f" or of the runs it was fine-tuned from ({', '.join(map(str, trained.sources))})"
                  if trained.sources else ""))
    return checked + (f"; not checked against the pretrained weights it started from, whose "
                      f"training images are unknown: {'; '.join(trained.unchecked)}"
                      if trained.unchecked else "")


# --- training and metrics ----------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """How every classifier of a study is trained: the same in every arm."""
    seeds: int = 3
    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    augment: bool = True  # random shifts and flips
    synthetic_share: float | None = None  # generated images' share of a topped-up class's draws


def train_classifier(pool: Pool, classes: int, arm: str, seed: int, steps: int, batch: int, *,
                     lr: float, augment: bool = True,
                     synthetic_share: float | None = None) -> nn.Module:
    weights = draw_weights(pool, arm, classes, synthetic_share)
    return fit(pool.images, pool.labels, classes, steps=steps, batch=batch, lr=lr, seed=seed,
               weights=weights, shifts=augment, flips=augment)


def scores(probs: np.ndarray, labels: np.ndarray, names: list[str],
           offsets: np.ndarray | None = None) -> dict:
    """The study's metrics at the default decision (argmax); with per-class `offsets` (from
    `tuned_offsets`), also balanced accuracy and recall at the decision they tune."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, recall_score,
                                 roc_auc_score)

    def recalls(pred):
        return recall_score(labels, pred, average=None, labels=range(len(names)), zero_division=0)

    pred = probs.argmax(1)
    auroc = (roc_auc_score(labels, probs[:, 1]) if len(names) == 2
             else roc_auc_score(labels, probs, multi_class="ovr"))
    tuned = {}
    if offsets is not None:
        tuned_pred = (_log(probs) + offsets).argmax(1)
        tuned = {TUNED: balanced_accuracy_score(labels, tuned_pred),
                 **({"tuned_threshold": binary_threshold(offsets)} if len(names) == 2 else {}),
                 **{f"recall@tuned[{n}]": float(r) for n, r in zip(names, recalls(tuned_pred))}}
    return {"accuracy": accuracy_score(labels, pred),
            "balanced_accuracy": balanced_accuracy_score(labels, pred),
            "macro_f1": f1_score(labels, pred, average="macro"), "auroc": auroc,
            **{f"recall[{n}]": float(r) for n, r in zip(names, recalls(pred))}, **tuned}


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, 1e-30, None))


def binary_threshold(offsets: np.ndarray) -> float:
    """The P(class 1) above which two-class offsets decide for class 1."""
    return float(1 / (1 + np.exp(offsets[1] - offsets[0])))


def tuned_offsets(probs: np.ndarray, labels: np.ndarray, rounds: int = 20) -> np.ndarray:
    """Per-class offsets added to the log-probabilities before the argmax that maximise balanced
    accuracy on a calibration split. One class at a time, the offset is searched exactly (every
    point where a decision changes, cut at midpoints, not a grid), until a round changes nothing;
    with two classes the first search is already the best threshold on P(class 1)."""
    log_probs, classes = _log(probs), probs.shape[1]
    counts = np.bincount(labels, minlength=classes).astype(float)
    weight = np.divide(1.0, counts, out=np.zeros(classes), where=counts > 0) / (counts > 0).sum()
    offsets = np.zeros(classes)
    for _ in range(rounds):
        moved = False
        for k in range(classes):
            delta = _best_shift(log_probs + offsets, labels, k, weight)
            offsets[k] += delta
            moved |= delta != 0
        if not moved:
            break
    return offsets


def _best_shift(logits: np.ndarray, labels: np.ndarray, k: int, weight: np.ndarray) -> float:
    """The change to class k's offset that most raises balanced accuracy (0 when none does). As
    the offset grows past c_i, image i's decision turns from its best other class to k."""
    others = logits.copy()
    others[:, k] = -np.inf
    other_class = others.argmax(1)
    cuts = others.max(1) - logits[:, k]
    order = np.argsort(cuts, kind="stable")
    cuts, flipped, was = cuts[order], labels[order], other_class[order]
    # balanced accuracy with no image decided as k, then after each flip, in order
    base = weight[labels][labels == other_class].sum()
    gain = np.where(flipped == k, weight[k], 0.0) - np.where(flipped == was, weight[was], 0.0)
    accuracy = base + np.concatenate([[0.0], np.cumsum(gain)])
    edges = np.concatenate([[cuts[0] - 1], cuts, [cuts[-1] + 1]])
    distinct = np.concatenate([[True], cuts[1:] > cuts[:-1], [True]])  # a cut between flips
    best = int(np.flatnonzero(distinct)[np.argmax(accuracy[distinct])])
    now = int(np.searchsorted(cuts, 0.0, side="left"))  # images with c_i < 0 are k's today
    if accuracy[best] <= accuracy[now] + 1e-12:
        return 0.0
    return float((edges[best] + edges[best + 1]) / 2)


# --- the study ---------------------------------------------------------------------------------

def class_fidelity(net: nn.Module, sets: dict[str, Pool], names: list[str]) -> dict:
    """Per synthetic set and class: the share of its images a classifier trained on the real
    images assigns to the class they were generated as (its recall on real test images is the
    real images' own)."""
    out = {}
    for arm, pool in sets.items():
        pred = predict(net, pool.images).argmax(1)
        out[arm] = {n: float((pred[pool.labels == i] == i).mean())
                    for i, n in enumerate(names) if (pool.labels == i).any()}
    return out


def study(real: Pool, synthetic: Pool, test: Pool, names: list[str], out: Path, *,
          leakage: str = "", calibration: Pool | None = None, log=print,
          copies: str = "not measured", selected: Pool | None = None, **recipe) -> dict:
    """The arms, `Recipe(**recipe)` for each classifier: real, real+synthetic, oversampled, and
    real+selected when `selected` (balance --select's kept images; `synthetic` is then as many
    candidates of each class, unselected). calibration: a labelled split on which each
    classifier's per-class thresholds are tuned."""
    r = Recipe(**recipe)
    sets = {"real+synthetic": synthetic, "real+selected": selected}
    sets = {arm: pool for arm, pool in sets.items() if pool is not None}
    pools = {"real": real, **{arm: combine(real, pool) for arm, pool in sets.items()},
             "oversampled": real}
    results: dict[str, list[dict]] = {arm: [] for arm in pools}
    fidelity = []
    for seed in range(r.seeds):
        for arm, pool in pools.items():
            t0 = time.time()
            net = train_classifier(pool, len(names), arm, seed, r.steps, r.batch, lr=r.lr,
                                   augment=r.augment, synthetic_share=r.synthetic_share)
            offsets = None if calibration is None else tuned_offsets(
                predict(net, calibration.images), calibration.labels)
            results[arm].append(scores(predict(net, test.images), test.labels, names, offsets))
            if arm == "real":
                fidelity.append(class_fidelity(net, sets, names))
            tuned = "" if offsets is None else (
                f", {results[arm][-1][TUNED]:.4f} at the tuned threshold"
                + (f" {binary_threshold(offsets):.2f}" if len(names) == 2 else "s"))
            log(f"seed {seed} {arm}: balanced accuracy "
                f"{results[arm][-1]['balanced_accuracy']:.4f}{tuned} ({time.time() - t0:.0f} s)")
    summary = _summarise(results)
    read = {"real": real, "synthetic": selected or synthetic, "test": test,
            "calibration": calibration}
    summary.update({"data": {k: p.source for k, p in read.items() if p is not None},
                    "classes": names, **asdict(r),
                    "class_fidelity": {arm: {c: float(np.mean([f[arm][c] for f in fidelity]))
                                             for c in fidelity[0][arm]} for arm in sets},
                    "calibration_images": None if calibration is None else len(calibration.labels),
                    "train_counts": {arm: np.bincount(p.labels, minlength=len(names)).tolist()
                                     for arm, p in pools.items()},
                    "test_counts": np.bincount(test.labels, minlength=len(names)).tolist(),
                    "leakage": leakage, "synthetic_copies": copies, "per_seed": results})
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "results.json", atomic.json_text(summary))
    atomic.write_text(out / "balanced_accuracy.svg", _bar_chart(summary))
    atomic.write_text(out / "report.md", _report(summary))
    log(f"{summary['verdict']}\nwrote {out}/report.md, results.json, balanced_accuracy.svg")
    return summary


def _gains(tests: dict) -> str:
    return ", ".join(f"{t['mean_gain']:+.4f} (p = {_p(t['p_value'], '.2g')})"
                     for t in tests.values())


def _p(value, fmt: str) -> str:
    """A p-value for the text; none exists when every seed gave the same difference."""
    return (format(value, fmt) if value is not None and math.isfinite(value)
            else "n/a (no spread across seeds)")


def primary_arm(arms) -> str:
    """The arm the verdict is about: the selected images where there are some."""
    return "real+selected" if "real+selected" in arms else "real+synthetic"


def _paired_tests(results: dict[str, list[dict]], metric: str) -> tuple[dict, float, bool]:
    """(the primary arm against each baseline: mean gain and paired-t p-value; the largest
    seed-to-seed std of the metric; whether both gains are positive and larger than that std)."""
    from scipy.stats import ttest_rel

    values = {arm: np.array([r[metric] for r in runs]) for arm, runs in results.items()}
    tests, primary = {}, primary_arm(results)
    for other in ("real", "oversampled"):
        diff = values[primary] - values[other]
        # differences equal but for float rounding have no spread either: t would be huge
        spread_of_diff = diff.std() > 1e-9 * max(1.0, float(np.abs(diff).max()))
        p = (float(ttest_rel(values[primary], values[other]).pvalue)
             if len(diff) > 1 and spread_of_diff else float("nan"))
        tests[f"{primary} vs {other}"] = {"mean_gain": float(diff.mean()), "p_value": p}
    spread = max(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values.values())
    least = min(t["mean_gain"] for t in tests.values())
    return tests, spread, least > spread and least > 0


def _summarise(results: dict[str, list[dict]]) -> dict:
    table = {arm: {k: (float(np.mean([r[k] for r in runs])),
                       float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0)
                   for k in runs[0]} for arm, runs in results.items()}
    tests, spread, improved = _paired_tests(results, "balanced_accuracy")
    default = (f"{primary_arm(results)}'s gains in balanced accuracy over real and oversampled "
               f"are {_gains(tests)}, against a largest seed-to-seed std of {spread:.4f}")
    summary = {"table": table, "paired_tests": tests}
    if TUNED not in next(iter(results.values()))[0]:
        return summary | {"verdict": f"{'improvement' if improved else 'no improvement'}: "
                                     f"{default}"}
    tuned_tests, tuned_spread, tuned_improved = _paired_tests(results, TUNED)
    summary["paired_tests_tuned"] = tuned_tests
    tuned = (f"at each classifier's threshold tuned on the calibration split they are "
             f"{_gains(tuned_tests)} (std {tuned_spread:.4f}); AUROC, which no threshold moves, "
             f"changes by {_gains(_paired_tests(results, 'auroc')[0])}")
    if improved and tuned_improved:
        headline = "improvement, at the default and at tuned thresholds"
    elif improved:
        headline = ("improvement at the default threshold only (not shown once thresholds are "
                    "tuned: the synthetic images may move the operating point rather than teach "
                    "the classifier more)")
    elif tuned_improved:
        headline = "no improvement at the default threshold, but an improvement at tuned thresholds"
    else:
        headline = "no improvement"
    return summary | {"verdict": f"{headline}: {default}; {tuned}"}


def _report(s: dict) -> str:
    keys = list(next(iter(s["table"].values())))
    lines = ["# Does the synthetic data help? (`ddpmkit downstream`)", "",
             f"**Verdict: {s['verdict']}.**", "",
             "Data: " + "; ".join(f"{k} {_text(v)}" for k, v in s["data"].items()), "",
             f"Classes {', '.join(map(_text, s['classes']))}; test images per class "
             f"{s['test_counts']}; "
             f"{s['seeds']} seeds per arm; each classifier (a small ResNet) trained for "
             f"{s['steps']} steps of batch {s['batch']} (AdamW, one-cycle lr {s['lr']}), "
             f"{'with random shifts and flips' if s['augment'] else 'without augmentation'}: "
             f"the same recipe in every arm.", "",
             "Training images per class: " + "; ".join(
                 f"{arm} {c}" + (" (each class drawn equally often)" if arm == "oversampled"
                                 else "") for arm, c in s["train_counts"].items())
             + ("" if s["synthetic_share"] is None else
                f"; in the arms with generated images, they are {s['synthetic_share']:g} of "
                f"a topped-up class's draws"), "",
             "| arm | " + " | ".join(_text(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for arm, row in s["table"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{m:.4f} ± {sd:.4f}" for m, sd in row.values())
                     + " |")
    lines += ["", "Paired t-tests of balanced accuracy over the same seeds:", ""]
    lines += [f"- {name}: mean gain {t['mean_gain']:+.4f}, p = {_p(t['p_value'], '.3g')}"
              for name, t in s["paired_tests"].items()]
    if "paired_tests_tuned" in s:
        lines += ["", f"The same at each classifier's threshold tuned on the calibration split "
                      f"({s['calibration_images']} images; column {TUNED}):", ""]
        lines += [f"- {name}: mean gain {t['mean_gain']:+.4f}, p = {_p(t['p_value'], '.3g')}"
                  for name, t in s["paired_tests_tuned"].items()]
    if s.get("class_fidelity"):
        lines += ["", "Class fidelity: the share of each class's images that the real-data "
                      "classifier (arm real, mean over seeds) assigns to that class:", ""]
        lines.append("- real test images: " + ", ".join(
            f"{_text(c)} {s['table']['real'][f'recall[{c}]'][0]:.3f}" for c in s["classes"]))
        lines += [f"- {arm[5:]} images: " + ", ".join(f"{_text(c)} {v:.3f}"
                                                      for c, v in shares.items())
                  for arm, shares in s["class_fidelity"].items()]
    lines += ["", f"Leakage: {_text(s['leakage'])}.", "",
              f"Near-copies of the generator's training images among the synthetic ones: "
              f"{_text(s['synthetic_copies'])}.", "",
              "![balanced accuracy per arm](balanced_accuracy.svg)", "",
              "Synthetic images are for research, not for diagnosis."]
    # class names and paths are the user's: as text, never as HTML a Markdown viewer would run
    return html.escape("\n".join(lines) + "\n", quote=False)


def _text(value) -> str:
    """A user's class name or path as literal Markdown: no link or image (their brackets), code
    span or table cell it could end (html.escape then takes '<' and '&')."""
    return re.sub(r"([\\`\[\]|])", r"\\\1", str(value)).replace("\n", " ")


COLOURS = {"real": "#888", "real+synthetic": "#2a7", "real+selected": "#c72", "oversampled": "#58c"}


def _bar_chart(s: dict) -> str:
    """Balanced accuracy per arm (mean and std over seeds); beside each bar, when the study was
    calibrated, the same at tuned thresholds (lighter)."""
    metrics = [m for m in ("balanced_accuracy", TUNED) if m in s["table"]["real"]]
    arms = list(s["table"])
    bars = [(arm, metric, *s["table"][arm][metric]) for arm in arms for metric in metrics]
    lo = max(0.0, min(m - sd for *_, m, sd in bars) - 0.05)
    hi = min(1.0, max(m + sd for *_, m, sd in bars) + 0.02)
    w, h, left, bottom = 480, 240, 50, 40

    def y(v):
        return h - bottom - (v - lo) / (hi - lo) * (h - bottom - 20)

    title = ("balanced accuracy (mean ± std over seeds)"
             + ("; lighter: at tuned thresholds" if len(metrics) > 1 else ""))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" '
             f'height="{h}" font-family="sans-serif" font-size="11">',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="#333"/>',
             f'<text x="8" y="14">{title}</text>']
    for tick in np.linspace(lo, hi, 5):
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" '
                     f'text-anchor="end">{tick:.2f}</text>')
    slot = (w - left - 20) / len(arms)
    width = slot * 0.6 / len(metrics)
    for k, (arm, metric, m, sd) in enumerate(bars):
        i, j = divmod(k, len(metrics))
        x = left + 10 + i * slot + j * width
        parts.append(f'<rect x="{x:.1f}" y="{y(m):.1f}" width="{width:.1f}" '
                     f'height="{y(lo) - y(m):.1f}" fill="{COLOURS[arm]}" '
                     f'fill-opacity="{1.0 if j == 0 else 0.45}"/>')
        cx = x + width / 2
        parts.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{y(m - sd):.1f}" '
                     f'y2="{y(m + sd):.1f}" stroke="#000"/>')
        parts.append(f'<text x="{cx:.1f}" y="{y(m + sd) - 4:.1f}" '
                     f'text-anchor="middle">{m:.3f}</text>')
        if j == 0:
            middle = left + 10 + i * slot + slot * 0.3
            parts.append(f'<text x="{middle:.1f}" y="{h - bottom + 16}" '
                         f'text-anchor="middle">{arm}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _without(pool: Pool, drop: np.ndarray) -> Pool:
    return Pool(pool.images[torch.from_numpy(~drop)], pool.labels[~drop], source=pool.source)


def load_calibration(pool: Pool, where: str, real_pool: Pool, test: Pool,
                     generators_trained: set[str], names: list[str]) -> tuple[Pool, str]:
    """Labelled real images (`pool`, read from `where`) to tune thresholds on, without those a
    classifier or the generator trained on (tuning on them would flatter every arm); refused if it
    shares images with the test split (a source without the named split falls back to another one,
    which must not pass silently)."""
    in_test = int(among(pool, set(test.digests)).sum())
    if in_test:
        raise UserError(f"calibration data {where}: {in_test} of its images are in the test split; "
                        f"tune thresholds on images the test does not hold")
    seen = among(pool, set(real_pool.digests) | generators_trained)
    pool = _without(pool, seen)
    if len(np.unique(pool.labels)) < 2:
        raise UserError(f"calibration data {where}: after dropping the {int(seen.sum())} images "
                        f"a classifier or the generator trained on, {len(pool.labels)} images of "
                        f"fewer than 2 classes are left; give held-out labelled images "
                        f"(--calibration PATH, or a separate split of --real)")
    _every_class(pool, names, f"calibration data {where}"
                 + (f" (after dropping {int(seen.sum())} images a classifier or the generator "
                    f"trained on)" if seen.any() else ""))
    note = (f"{int(seen.sum())} calibration images a classifier or the generator trained on "
            f"were dropped; ")
    return pool, note if seen.any() else ""


def _has_splits(source: DataConfig) -> bool:
    """Whether data.split chooses among parts of the source; a labels CSV names one set of
    images."""
    return source.labels is None and has_named_splits(source.path)


def _holds_val(source: DataConfig) -> bool:
    """Whether `source` has a val split for the study's thresholds by default."""
    return _has_splits(source) and "val" in (named_splits(source.path) or set())


def _split_source(real: DataConfig, separate: DataConfig | None, split: str | None, default: str,
                  flag: str) -> tuple[DataConfig, str]:
    """What to read for the test or calibration images, and its split: `split` (None: `default`) of
    a separate source that has splits, a separate source without them (a plain or CSV-labelled
    folder, an .npy) whole, and without a separate source, that split of --real. A split named for a
    source without splits is refused rather than ignored."""
    if separate is not None:
        if _has_splits(separate):
            return separate, split or default
        if split is not None:
            raise UserError(
                f"{flag}-split {split}: {flag} {separate.path} has no splits "
                f"({'a CSV names its images' if separate.labels else 'it is one set of images'}): "
                f"drop {flag}-split, or point {flag} at the {split} images")
        return separate, DataConfig.split
    split = split or default
    held = named_splits(real.path)
    if not _has_splits(real) or (held is not None and split not in held
                                 and split.lower() not in held):
        raise UserError(f"--real {real.path} has no '{split}' split to take the {flag[2:]} images "
                        f"from: give them with {flag} (and {flag}-labels if a CSV names them)")
    return real, split


def load_study_data(real: str | DataConfig, synthetic: str, test: str | DataConfig | None = None,
                    real_split: str = "train", test_split: str | None = None, *,
                    unverified: bool = False, drop_seen: bool = False,
                    calibration: str | DataConfig | None = None,
                    calibration_split: str | None = None,
                    batch: int = Recipe.batch
                    ) -> tuple[list[str], Pool, Pool, Pool, Pool | None, str]:
    """Class names, the real, synthetic, test and calibration pools at the generator's resolution,
    and the leakage check. Each real source is a path or a data section (for a labels CSV).
    Calibration images come from `calibration` (default: `real`), split `calibration_split`
    (default: val), when either is given; with neither, from `real`'s val split where it has one
    (and it can be used: otherwise the leakage note says why not), else None. drop_seen removes
    the test images the generator or the classifiers saw instead of refusing (for choosing on a
    validation split that shares images with the training split; never for the final study).
    """
    real, test, calibration = as_source(real), as_source(test), as_source(calibration)
    # a split flag that cannot apply: before any read
    _split_source(real, test, test_split, "test", "--test")
    automatic = (calibration is None and calibration_split is None and _holds_val(real)
                 and not (test is None and (test_split or "").lower() == "val"))
    calibration_split = "val" if automatic else calibration_split
    if calibration is not None or calibration_split is not None:
        _split_source(real, calibration, calibration_split, "val", "--calibration")
    synth_folder = Path(synthetic)
    probe = load_images(replace(real, split=real_split, image_size=8))  # its labels only
    if not probe.labels:
        raise UserError(f"{real.path}: no labels; the study needs labelled real images "
                        f"(class subfolders, an .npz with *_labels or y, "
                        f"or a CSV naming them: --real-labels)")
    names = class_order(probe.labels)
    synth, runs = load_synthetic(synth_folder, names)
    size = synth.images.shape[-1]  # the study runs at the generator's resolution
    check_study_fits(size, synth.images.shape[1], len(probe.labels) + len(synth.labels), batch)
    depth = recorded_bit_depth(runs)
    real, test, calibration = (source if source is None or source.bit_depth is not None
                               else replace(source, bit_depth=depth)
                               for source in (real, test, calibration))
    real_pool = load_real(real, real_split, size, synth.images.shape[1], names)
    test_source = _split_source(real, test, test_split, "test", "--test")
    test_pool = load_real(*test_source, size, synth.images.shape[1], names)
    # read once, for every check below
    lineage = generators_training_digests(runs, size, synth.images.shape[1], not unverified)
    trained = lineage.digests
    dropped, real_digests = "", set(real_pool.digests)
    tuned = tuned_on(test_pool, test_source, synth_folder, names)
    if drop_seen:
        test_pool, dropped = _drop_seen(test_pool, test_split or "test", trained, real_digests,
                                        set(synth.digests), tuned)
    calibration_pool = None
    if calibration is not None or calibration_split is not None:
        source, split = _split_source(real, calibration, calibration_split, "val", "--calibration")
        try:
            pool = load_real(source, split, size, synth.images.shape[1], names)
            calibration_pool, note = load_calibration(pool, _named(source, split), real_pool,
                                                      test_pool, trained, names)
        except UserError as exc:
            if not automatic:  # asked for: refused; taken by default: said in the report
                raise
            note = f"thresholds not tuned on {_named(source, split)}: {exc}; "
        dropped += note
    _every_class(test_pool, names, _named(*test_source))
    if not drop_seen:  # a choice on a val split may be made where the thresholds were set
        refuse_selection_tuned_on(tuned, synth_folder, test_split or "test")
    refuse_real_among_synthetic(synth, (test_pool, test_split or "test"),
                                (calibration_pool, "calibration"))
    leakage = check_no_leakage(test_pool, runs, lineage, not unverified, test_split or "test")
    leakage += f" ({dropped.removesuffix('; ')})" if dropped else ""
    in_real = int(among(test_pool, real_digests).sum())
    if in_real:  # every arm's classifier trains on them: each score would be flattered
        raise UserError(f"{_named(*test_source)}: {in_real} of its images are among the real "
                        f"training images ({_named(real, real_split)}); test on images no "
                        f"classifier trains on")
    return names, real_pool, synth, test_pool, calibration_pool, leakage


def other_real(folder: Path, real: Pool, names: list[str], named: str) -> str | None:
    """A balanced set tops up the real images its manifest lists: with other real images, the
    real+synthetic arm is not the set balance planned (a balanced split made imbalanced)."""
    header, *rows = read_manifest(folder / "manifest.csv", header=False)
    real_rows = [r for r in (dict(zip(header, row)) for row in rows)
                 if r.get("synthetic") == "false"]
    if not real_rows:  # a sampling job's folder: no plan to keep to
        return None
    planned = Counter(row.get("label") for row in real_rows)
    given = Counter(names[i] for i in real.labels)
    other = [c for c in names if planned.get(c, 0) != given.get(c, 0)]
    if not other:
        return None
    c = other[0]
    return (f"{folder}/manifest.csv tops up {planned.get(c, 0)} real {c} images, and --real "
            f"{named} has {given.get(c, 0)}: the real+synthetic arm is not the balanced set; give "
            f"--real the data the balance read")


def check_study_fits(size: int, channels: int, images: int, batch: int) -> None:
    """The study's images at its size, and its classifiers' activations, against memory: before
    the real images are read at that size."""
    pools = 2 * images * channels * size**2  # the real and synthetic pools, and as many for test
    nets = max(batch * FIT_BYTES_PER_PIXEL, 512 * PREDICT_BYTES_PER_PIXEL) * size**2
    check_memory(pools + nets, f"a study at {size}x{size} ({images} real and synthetic images, "
                               f"classifiers trained at batch {batch})",
                 "study the balance output written at the generator's size (without sample.size)")


def run_study(real: str | DataConfig, synthetic: str, out: str, *,
              test: str | DataConfig | None = None, real_split: str = "train",
              test_split: str | None = None, unverified: bool = False,
              calibration: str | DataConfig | None = None, calibration_split: str | None = None,
              fresh: bool = False, force: bool = False, log=print, **recipe) -> dict:
    """The CLI's entry: real data (its train split), the synthetic folder, the test split; each real
    source a path or a data section (a folder and the CSV that labels it). `recipe`: Recipe's."""
    r = Recipe(**recipe)
    if r.seeds < 2:  # one seed has no seed-to-seed spread, and any lucky gain would read as one
        raise UserError(f"--seeds {r.seeds}: a verdict needs at least 2 seeds per arm "
                        f"(3 or more is better)")
    if r.steps < 1:
        raise UserError(f"--steps {r.steps}: each classifier needs at least 1 optimizer step")
    if r.synthetic_share is not None and not 0 < r.synthetic_share <= 1:
        raise UserError(f"--synthetic-share {r.synthetic_share}: give a fraction above 0 and at "
                        f"most 1 (at 0 the arms would draw no generated image)")
    reads = tuple(Path(s.path if isinstance(s, DataConfig) else s)
                  for s in (real, test, calibration, synthetic) if s is not None)
    refuse_special(Path(out), reads, STUDY.what)  # before anything is read
    identity = {"real": _source(real), "test": _source(test), "calibration": _source(calibration),
                "synthetic": _source(synthetic), "real_split": real_split,
                "test_split": test_split, "calibration_split": calibration_split,
                "unverified": unverified, **asdict(r)}
    folder = OutputFolder(out, STUDY, identity, fresh=fresh, force=force, reads=reads)
    return _run_study(real, synthetic, folder,
                      test, real_split, test_split, unverified=unverified,
                      calibration=calibration, calibration_split=calibration_split, log=log,
                      recipe=r)


def _source(source: str | DataConfig | None):
    """A study source as its record names it: the data it reads, wherever it was run from."""
    if isinstance(source, DataConfig):
        return {k: str(Path(v).resolve()) if k in ("path", "labels") and v else v
                for k, v in asdict(source).items()}
    return None if source is None else str(Path(source).resolve())


def _run_study(real, synthetic: str, out: OutputFolder, test, real_split: str,
               test_split: str | None, *, unverified: bool, calibration,
               calibration_split: str | None, log, recipe: Recipe) -> dict:
    """The data read and checked, then the study, in `out` claimed (its files are replaced at the
    end)."""
    names, real_pool, synth, test_pool, calibration_pool, leakage = load_study_data(
        real, synthetic, test, real_split, test_split, unverified=unverified,
        calibration=calibration, calibration_split=calibration_split, batch=recipe.batch)
    unplanned = other_real(Path(synthetic), real_pool, names, _named(as_source(real), real_split))
    if unplanned:
        log(f"warning: {unplanned}")
    size = synth.images.shape[-1]
    calibrated = "" if calibration_pool is None else f", {len(calibration_pool.labels)} calibration"
    log(f"study: {len(real_pool.labels)} real, {len(synth.labels)} synthetic, "
        f"{len(test_pool.labels)} test{calibrated} images at {size}x{size}; leakage {leakage}")
    copies = copy_rate(synth, job_runs(Path(synthetic)), recorded_copy_threshold(Path(synthetic)))
    unselected = load_unselected(Path(synthetic), size, names, synth)
    copies += "" if unselected is None else ", among the selected images"
    log(f"near-copies of the generator's training images: {copies}")
    if unselected is not None:
        log(f"study: balance --select output: arm real+selected takes its {len(synth.labels)} kept "
            f"images, real+synthetic as many unselected candidates")
    synth, selected = (synth, None) if unselected is None else (unselected, synth)
    with out:
        return study(real_pool, synth, test_pool, names, out.path, leakage=leakage,
                     calibration=calibration_pool, log=log, copies=copies, selected=selected,
                     **asdict(recipe))


# per input pixel of an image: what the classifier keeps for its backward (saved_tensors_hooks),
# with headroom, and what a forward without gradients holds at once (predict's chunks of 512)
FIT_BYTES_PER_PIXEL, PREDICT_BYTES_PER_PIXEL = 4096, 512
STUDY_FILES = ("report.md", "results.json", "balanced_accuracy.svg")
STUDY = Kind("study", "downstream study", "study results", "files no ddpmkit study wrote there",
             lambda out: existing(out, STUDY_FILES), lambda _job: set(STUDY_FILES).__contains__)


def recorded_copy_threshold(folder: Path) -> float | None:
    """The threshold `--drop-copies` used for the jobs under `folder` (one for all), if it ran."""
    found = set()
    for job in job_identities(folder):
        drop = job.get("drop_copies")
        threshold = drop.get("threshold") if isinstance(drop, dict) else None
        if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and (
                0 <= threshold <= 2):  # a distance 1 - correlation; anything else is not ours
            found.add(float(threshold))
    return found.pop() if len(found) == 1 else None


def copy_rate(synthetic: Pool, runs: list[Path], threshold: float | None = None) -> str:
    """The share of the synthetic images that are near-copies of the generator's training images
    (metrics/memorization.py), as a sentence: at the threshold --drop-copies used where it ran
    (calibrated as the user chose), else calibrated leave-one-out."""
    if len(runs) != 1:
        return "not measured (the synthetic set does not name one generator)"
    try:
        train = RunDir(runs[0]).training_images(log=lambda *_: None)
    except UserError as exc:
        return f"not measured ({exc})"
    if train.shape[1] != synthetic.images.shape[1]:
        return "not measured (the synthetic images have other channels than the generator's)"
    # as the audit compares images written at --size: both at the generator's size
    images = resize_center_crop(synthetic.images, train.shape[-1])
    train = as_sampled(train, synthetic.images.shape[-1])
    search = partial(nearest, views=seen_views(RunDir(runs[0]).config()))  # as the run trained
    if threshold is not None:
        copies = is_copy(search(images, train).d1, threshold)
        return (f"{copies.mean():.1%} ({int(copies.sum())} of {len(copies)}; threshold "
                f"{threshold:.4f}, the one --drop-copies used)")
    found = audit(images, train, search=search)
    return (f"{found.copy_rate:.1%} ({int(found.copies.sum())} of {len(found.copies)}; threshold "
            f"{found.calibration.threshold:.4f}, calibrated {found.calibration.on})")
