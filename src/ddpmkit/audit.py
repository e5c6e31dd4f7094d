"""`ddpmkit audit GEN --ref RUN [--holdout DATA]`: are the generated images copies of the images
the run was trained on? The method is metrics/memorization.py's; this reads the sets, checks
them, and writes the answer: GEN/audit.json and GEN/audit.html (the closest pairs side by side).

Near-copies are decided in pixels; the same search in a feature space (EfficientNet where installed,
else a classifier trained on the run's labelled images) is reported beside it, with its own
calibrated threshold, so a user sees what each view flags.
"""

from __future__ import annotations

import html
import os
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .data import ImageData, resize_center_crop
from .errors import UserError
from .images import make_grid, png_bytes, scale_for_viewing
from .metrics import features as fx
from .metrics.evaluate import cache_dir, cached_features, read_generated
from .metrics.memorization import (Audit, as_matched, as_sampled, audit, nearest,
                                   nearest_features, seen_views)
from .outputs import (PAGE_HEAD, RECORD, holds_data, job_identities, job_runs, manifest_images,
                      refuse_being_written, write_about_images)
from .pixels import IMAGE_SUFFIXES
from .report import CSS, data_uri, svg_plot
from .run import RunDir
from .runtime import resolve_device

PAIRS_SHOWN = 24  # closest pairs on the page


def generated_images(gen: Path, size: int) -> tuple[torch.Tensor, list[str], list[str], int]:
    """The generated images at the size the audit compares (the run's, or theirs where smaller:
    a --size output is resized down, a smaller one kept), each one's class from its manifest
    ('' where none), its file, and the size they were written at."""
    images, files = read_generated(gen)
    labels = {str(path): row.get("label", "") for path, row in manifest_images(gen, "file")}
    written = min(images.shape[-2:])
    return (resize_center_crop(images, min(size, written)), [labels.get(f, "") for f in files],
            files, written)


def _say_unread(gen: Path, files: list[str], log) -> None:
    """Image files under GEN the audit does not read: in no manifest there (a sample's
    individual/ holds one a user copied in) or beside a folder's individual/. A copy among
    them would go unreported, so they are named."""
    jobs = [m.parent for m in gen.rglob("manifest.csv")]
    listed = {str(p) for job in jobs for p, _ in manifest_images(job, "file")
              or manifest_images(job, "output")} | set(files)
    written = {str(job / "grid.png") for job in jobs}  # a restoration's before/after grid
    unread = sorted(p for p in gen.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                    and p.is_file() and not p.is_symlink() and str(p) not in listed | written
                    and "grids" not in p.relative_to(gen).parts)
    if unread:
        log(f"audit: warning: {len(unread)} image file(s) under {gen} are not audited (in no "
            f"manifest there, or beside individual/), e.g. {unread[0]}: audit them on their own")


def _refuse_another_runs_images(gen: Path, run: RunDir) -> None:
    """GEN's job records name the run, checkpoint and training images that made it: an audit
    against other training images would measure nothing."""
    jobs = [job for job in job_identities(gen) if isinstance(job.get("run"), str)]
    ours = {e["sha256"] for e in run.read_state()["checkpoints"]}
    if not jobs or any(str(job.get("checkpoint_sha256")) in ours for job in jobs):
        return
    if not any(job["run"] == str(run.path.resolve()) for job in jobs):
        raise UserError(f"{gen} was made by {jobs[0]['run']} (its {RECORD} says), not by "
                        f"{run.path}: audit it against the run that made it")
    now = run.training_images_sha256()  # restoration records do not name it
    if not any(job.get("training_images_sha256", now) == now for job in jobs):
        raise UserError(f"{gen} was made by {run.path} before it was trained again on other "
                        f"images (its {RECORD} says): audit it against a run of the images it "
                        f"trained on then")


def _maker(gen: Path) -> Path:
    """The one run GEN's job records name, for an audit given no --ref."""
    runs = job_runs(gen)
    if len(runs) != 1:
        made_by = f"was made by {len(runs)} runs" if runs else "names no run that made it"
        raise UserError(f"{gen} {made_by}: give the run that generated it with --ref RUN")
    if not RunDir(runs[0]).is_run():
        raise UserError(f"{gen}'s {RECORD} names the run {runs[0]}, which is not there (moved?): "
                        f"give the run with --ref RUN")
    return runs[0]


def run_audit(gen: str | Path, ref: str | Path | None, holdout: str | None = None,
              share: float = 0.01, features: str = "auto", *, drop_overlap: bool = False,
              log=print) -> dict:
    """Audit GEN against the training images of RUN (`ref`; None: the run GEN's records name);
    returns the summary (also written into GEN)."""
    gen = Path(gen)
    if not 0 < share < 0.5:
        raise UserError(f"--share {share}: the share of held-out images that may be flagged, "
                        f"above 0 and below 0.5, e.g. 0.01")
    if gen.is_file():
        raise UserError(f"{gen} is a file: give the folder of generated images that holds it")
    if not gen.is_dir():
        raise UserError(f"generated-images folder not found: {gen}")
    refuse_being_written(gen)  # before the training images are read
    run = RunDir(_maker(gen) if ref is None else ref)
    if features not in FEATURES:
        raise UserError(f"--features {features}: one of {', '.join(FEATURES)}")
    data, cfg = run.training_set(log), run.config()
    if holds_data(gen, cfg.data.path):
        raise UserError(f"{gen} holds {run.path}'s training data: audit a folder of generated "
                        f"images (one inside the data folder is fine)")
    _refuse_another_runs_images(gen, run)
    gen_images, labels, files, gen_size = generated_images(gen, cfg.data.image_size)
    _say_unread(gen, files, log)
    train = as_sampled(data.images, gen_size)
    if gen_images.shape[1] != train.shape[1]:
        kind = "grayscale" if train.shape[1] == 1 else "RGB"
        raise UserError(f"{gen} holds {gen_images.shape[1]}-channel images and {run.path} was "
                        f"trained on {train.shape[1]}-channel ones: save them as {kind} images, "
                        f"or audit them against the run that made them")
    held = as_sampled(run.holdout_images(holdout, drop_overlap, log), gen_size)
    views = seen_views(cfg)
    result = audit(gen_images, train, held, share, partial(nearest, views=views))
    result.calibration.warn("audit", log, "give more held-out images (--holdout) or a larger "
                                          "--share")
    summary = {"written_by": "ddpmkit audit", "gen": str(gen.resolve()),
               "run": str(run.path.resolve()),
               "holdout": holdout if holdout is None or "=" in holdout
               else str(Path(holdout).resolve()),
               "holdout_images": 0 if held is None else len(held), "share": share,
               "training_views": ["as trained", *views],
               **summarise(result, labels, len(train))}
    _name_images(summary, [os.path.relpath(f, gen) for f in files], data.origins())
    extractor = feature_extractor(features, data, log)
    if extractor is not None:
        add_feature_view(summary, extractor, (gen_images, train, held), result, log)
    write_about_images({gen / "audit.json": atomic.json_text(summary),
                        gen / "audit.html": page(summary, result, gen_images, train)},
                       "ddpmkit audit")
    log(f"{summary['copies']} of {summary['generated']} generated images "
        f"({summary['copy_rate']:.1%}) are near-copies of training images (threshold "
        f"{result.calibration.threshold:.4f}, calibrated on {result.calibration.on} images"
        f"{'; training images also searched ' + '/'.join(views) if views else ''})"
        f"{_in_features(summary)}; wrote {gen}/audit.json and {gen}/audit.html")
    return summary


FEATURES = ("auto", "efficientnet", "classifier", "none")


def feature_extractor(choice: str, data: ImageData, log) -> fx.Extractor | None:
    """auto: EfficientNet where installed, else a classifier of the run's labelled images, else
    none (pixels only)."""
    if choice in ("auto", "efficientnet"):
        try:
            return fx.efficientnet(resolve_device("auto"))
        except UserError:
            if choice == "efficientnet":
                raise
    labelled = data.labels is not None and len(set(data.labels)) >= 2
    if choice == "classifier" and not labelled:
        raise UserError("--features classifier trains on the run's labels, and its images have "
                        "fewer than two classes: use --features efficientnet or none")
    if choice == "none" or not labelled:
        return None
    return fx.classifier(data.images, data.labels, cache_dir(), log)


def _real_features(extractor: fx.Extractor, images: torch.Tensor, log) -> torch.Tensor:
    return torch.from_numpy(cached_features(extractor, images, log)[0])


def add_feature_view(summary: dict, extractor: fx.Extractor, sets: tuple, in_pixels: Audit,
                     log=print) -> None:
    """The same audit on (generated, training, held-out or None) images' features, into the
    summary: its own numbers, and each generated image's nearest training image in features.
    The real images' features are cached: auditing again against the same run is quicker. The
    calibration sets aside the duplicates the pixels found."""
    gen, train, held = sets
    found = audit(torch.from_numpy(extractor(gen)[0]), _real_features(extractor, train, log),
                  None if held is None else _real_features(extractor, held, log),
                  summary["share"], nearest_features, in_pixels.calibration.aside_rows)
    summary["features"] = {"extractor": extractor.name, **found.calibration.summary(),
                           "copies": int(found.copies.sum()), "copy_rate": found.copy_rate,
                           "copies_in_both": int((found.copies & in_pixels.copies).sum()),
                           "same_nearest_image": float((found.neighbours.index
                                                        == in_pixels.neighbours.index).mean())}
    n = found.neighbours
    for row, j, d, r in zip(summary["nearest"], n.index, n.d1, n.ratio):
        row |= {"feature_training_image": int(j), "feature_distance": float(d),
                "feature_ratio": float(r)}


def summarise(result: Audit, labels: list[str], train_count: int) -> dict:
    """The numbers: copy rate overall and per class, the training images copied and how often,
    the distance histograms, and each generated image's nearest neighbour."""
    n = result.neighbours
    copied = Counter(n.index[result.copies].tolist())
    per_class = {}
    for label in sorted(set(labels)):
        rows = np.array([lab == label for lab in labels])
        per_class[label or "(none)"] = {"generated": int(rows.sum()),
                                        "copy_rate": float(result.copies[rows].mean())}
    reference = result.calibration.reference_d1
    top = max(float(n.d1.max()), float(reference.max()), 1e-6)
    bins = np.linspace(0, top, 31)
    nearest = [{"generated": i, "training_image": int(j), "distance": float(d), "ratio": float(r),
                "copy": bool(c)} for i, (j, d, r, c) in enumerate(zip(n.index, n.d1, n.ratio,
                                                                      result.copies))]
    return {"generated": len(labels), "copies": int(result.copies.sum()),
            "copy_rate": result.copy_rate, **result.calibration.summary(),
            "per_class": per_class,
            "training_images_copied": len(copied),
            "training_share_copied": len(copied) / train_count,
            "most_copied": [{"training_image": i, "times": k} for i, k in copied.most_common(10)],
            "distances": {"bins": bins.tolist(), "generated": np.histogram(n.d1, bins)[0].tolist(),
                          "reference": np.histogram(reference, bins)[0].tolist()},
            "nearest": nearest}


def _name_images(summary: dict, generated: list[str], training: list[str]) -> None:
    """Each nearest pair's files (generated: relative to GEN; training: its file or array#index),
    so a flagged image can be found."""
    for row in summary["nearest"]:
        row |= {"file": generated[row["generated"]],
                "training_file": training[row["training_image"]]}
    for row in summary["most_copied"]:
        row["training_file"] = training[row["training_image"]]


def page(summary: dict, result: Audit, gen: torch.Tensor, train: torch.Tensor) -> str:
    """The audit as one self-contained page: numbers, the two distance histograms, closest pairs."""
    e, n = html.escape, result.neighbours
    pairs = "".join(_pair(summary, result, gen, train, i) for i in np.argsort(n.d1)[:PAIRS_SHOWN])
    bins, hist = summary["distances"]["bins"], summary["distances"]
    centres = [(a + b) / 2 for a, b in zip(bins, bins[1:])]
    shares = {k: (np.array(hist[k], float) / max(1, sum(hist[k]))).tolist()
              for k in ("generated", "reference")}
    plot = svg_plot([("generated", centres, shares["generated"]),
                     (summary["calibrated_on"], centres, shares["reference"])],
                    "distance to the nearest training image", "share of images")
    classes = "".join(f"<tr><td>{e(name)}</td><td>{c['generated']}</td>"
                      f"<td>{c['copy_rate']:.1%}</td></tr>"
                      for name, c in summary["per_class"].items())
    return (f"{PAGE_HEAD}audit</title><style>{CSS}</style></head><body><h1>Memorization audit</h1>"
            f"<p>{summary['copies']} of {summary['generated']} generated images "
            f"({summary['copy_rate']:.1%}) are closer to a training image than "
            f"{(1 - summary['share']) * 100:g}% of {e(summary['calibrated_on'])} real images are "
            f"(threshold "
            f"{summary['threshold']:.4f}); {summary['training_images_copied']} training images "
            f"were copied.</p><p class='muted'>{e(summary['gen'])} against "
            f"{e(summary['run'])}</p><p>{e(_in_features(summary).lstrip('; ').capitalize())}.</p>"
            f"<h2>Distances</h2><figure>{plot}<figcaption>orange: "
            f"generated; blue: {e(summary['calibrated_on'])} real images</figcaption></figure>"
            f"<h2>Per class</h2><table><tr><th>class</th><th>generated</th><th>copies</th></tr>"
            f"{classes}</table><h2>Closest pairs (generated, training)</h2>"
            f"<div class='strip'>{pairs}</div></body></html>")


def _pair(summary: dict, result: Audit, gen: torch.Tensor, train: torch.Tensor, i: int) -> str:
    """Generated image i beside its nearest training image, shown in the view it matched in."""
    shown, turned = as_matched(gen[i], train[result.neighbours.index[i]],
                               tuple(summary["training_views"][1:]))
    row = summary["nearest"][i]
    return (f"<figure><img alt='pair {i}' src='{_uri(torch.stack([gen[i], shown]))}'>"
            f"<figcaption>{html.escape(row['file'])} · training "
            f"{html.escape('/'.join(Path(row['training_file']).parts[-2:]))}"
            f"{' (shown as matched: flipped or turned)' if turned else ''} · d "
            f"{result.neighbours.d1[i]:.4f}{' · copy' if result.copies[i] else ''}</figcaption>"
            f"</figure>")


def _in_features(summary: dict) -> str:
    f = summary.get("features")
    if f is None:
        return "; no feature-space view (--features none, or no extractor for these images)"
    return (f"; in {f['extractor']} features {f['copies']} ({f['copy_rate']:.1%}), "
            f"{f['copies_in_both']} of them flagged in both")


def _uri(images: torch.Tensor) -> str:
    data = png_bytes(scale_for_viewing(make_grid(images, ncol=2), min_side=128))
    return data_uri(data, "image/png")
