"""`ddpmkit eval`: generated images against a reference, on one feature extractor.

GEN is a `sample` output folder (its manifest, else its individual/ images; never the grids) or any
folder of images. The reference is data (a folder of images as pytorch-fid and clean-fid take it,
or `data.path=...` overrides, read like training data), a run directory (its training data) or a
statistics .npz (mu/sigma; FID only). Reference features
are cached under ~/.cache/ddpmkit/eval, keyed by the reference pixels and the extractor, so a
second evaluation against the same data only extracts the generated images.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import atomic
from ..config import DataConfig, data_config, parse_override
from ..data import check_npz_member, load_images
from ..errors import UserError
from ..outputs import (job_runs, manifest_images, refuse_being_written, refuse_unfinished,
                       write_about_images)
from ..pixels import IMAGE_SUFFIXES, read_image_files
from ..run import RunDir, recorded_bit_depth
from ..runtime import version
from . import features as fx
from .stats import FeatureStats, frechet_distance, inception_score, kid, precision_recall

METRICS = ("fid", "kid", "pr", "is")
CONFIDENCE = 0.9


def cache_dir() -> Path:
    return Path(os.environ.get("DDPMKIT_CACHE", Path.home() / ".cache" / "ddpmkit")) / "eval"


@dataclass
class Reference:
    description: str
    images: torch.Tensor | None = None  # uint8 N x C x H x W
    labels: list[str] | None = None
    stats: FeatureStats | None = None
    feats: np.ndarray | None = None  # from a file written by --save-ref: KID and P/R work too
    extractor: dict | None = None  # the identity of the extractor those features came from
    read_at: int | None = None  # the side its images were read at, for features from --save-ref


def read_generated(folder: str | Path) -> tuple[torch.Tensor, list[str]]:
    """uint8 images of a sample output (manifest order) or of any image folder, all of one size
    (images of several are refused: resized, they would be judged at a size they do not have)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"generated-images folder not found: {folder}")
    refuse_being_written(folder)
    # sample and balance outputs name images in "file", restoration outputs in "output"; a balanced
    # set lists its real images too (synthetic=false): they are not generated
    files = [path for path, _ in manifest_images(folder, "file")
                                 or manifest_images(folder, "output")]
    if not files:
        refuse_unfinished(folder)
        root = folder / "individual" if (folder / "individual").is_dir() else folder
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       and "grids" not in p.relative_to(root).parts)
    if not files:
        raise UserError(f"no images in {folder} "
                        f"(expected a ddpmkit sample folder or a folder of images)")
    images = read_image_files(files, f"the images in {folder}").images
    sizes = sorted({tuple(img.shape[-2:]) for img in images})
    if len(sizes) > 1:
        raise UserError(f"{folder} holds images of {len(sizes)} sizes ({sizes[0]}, {sizes[1]}...): "
                        f"give one sampling job's images, or images of one size")
    return torch.stack(images), [str(p) for p in files]


def resolve_reference(refs: list[str], gen_size: int,
                      gen: str | Path | None = None) -> Reference:
    """The reference: data.key=value overrides, or one folder of images, run directory or statistics
    .npz. Data is read at the generated resolution, in its own channels (as a run trained on it, or
    data.channels=..., says), and unless data.bit_depth is given, at the depth the runs that
    generated `gen` recorded (their records name them), as their training images were."""
    paths = [r for r in refs if "=" not in r or Path(r).exists()]  # a folder may be named a=b
    overrides = [r for r in refs if r not in paths]
    if overrides and paths or len(paths) > 1 or not refs:
        raise UserError("--ref takes data.key=value overrides, or one folder of images, "
                        "run directory or statistics .npz")
    if paths and Path(paths[0]).suffix == ".npz" and _holds_statistics(Path(paths[0])):
        return _statistics(Path(paths[0]))
    if paths and RunDir(paths[0]).is_run():
        path = Path(paths[0])
        _refuse_imported(path, paths[0])
        RunDir(path).training_set(log=lambda *_: None)  # refused where its data changed since
        return _from_data(replace(RunDir(path).config().data, image_size=gen_size),
                          f" (training data of {path})")
    if paths and Path(paths[0]).is_dir():  # a half-written reference would shift every metric
        refuse_being_written(Path(paths[0]))
    if paths and not Path(paths[0]).exists():
        raise UserError(f"--ref {paths[0]}: not found (give a folder of images, a run directory, "
                        f"a statistics .npz, or data.path=...)")
    given = dict(parse_override(r) for r in overrides) if overrides else {"data.path": paths[0]}
    runs = job_runs(Path(gen)) if gen is not None else []
    base = {} if "data.path" in given else _run_data(runs, overrides, gen)
    # compared at the generated resolution
    values = base | {"data.image_size": gen_size} | given
    depth = recorded_bit_depth(runs) if gen is not None else None
    if depth is not None:
        values.setdefault("data.bit_depth", depth)
    return _from_data(data_config(values))


def _run_data(runs: list[Path], overrides: list[str], gen) -> dict:
    """data.key=value without data.path changes the data of the run that made GEN
    (data.split=test: its test split), as --holdout does elsewhere."""
    if len(runs) != 1:
        raise UserError(f"--ref {' '.join(overrides)}: no data.path, and {gen} was not made by "
                        f"one run whose data this could change: add data.path=... "
                        f"(data.path=null is the bundled digits)")
    _refuse_imported(runs[0], " ".join(overrides))
    return RunDir(runs[0]).data_values()


def _refuse_imported(run: Path, ref: str) -> None:
    if RunDir(run).imported_from():
        raise UserError(f"--ref {ref}: {run} is an imported model, which has no training data of "
                        f"its own to compare with: give the reference images as --ref FOLDER "
                        f"or --ref data.path=...")


def _npz_arrays(path: Path) -> set[str] | None:
    """The array names of an .npz file (None: not one that reads as a zip of arrays)."""
    if path.is_symlink() or not path.is_file() or atomic.head(path, 4) != b"PK\x03\x04":
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return set(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _holds_statistics(path: Path) -> bool:
    """An .npz of feature statistics (mu, sigma), not of images; one that cannot be read is taken
    for statistics, whose reader says what is wrong with it."""
    arrays = _npz_arrays(path) if path.is_file() else set()
    return arrays is None or {"mu", "sigma"} <= arrays


def _statistics(path: Path) -> Reference:
    for key in _npz_arrays(path) or ():  # shapes from the headers, before a member is inflated
        check_npz_member(path, key, "give the reference images instead")
    stats = FeatureStats.load(path)
    with np.load(path, allow_pickle=False) as z:
        if not {"feats", "extractor"} <= set(z.files):
            return Reference(f"statistics {path}", stats=stats)
        try:
            feats, extractor = z["feats"].astype(np.float64), json.loads(str(z["extractor"]))
            read_at = int(z["read_at"]) if "read_at" in z.files else None
        except (ValueError, TypeError) as exc:
            raise UserError(f"{path}: its feats, extractor or read_at cannot be read "
                            f"({str(exc)[:80]}): write it again with --save-ref") from None
    if feats.ndim != 2 or feats.shape[1] != len(stats.mu):
        raise UserError(f"{path}: its feats {feats.shape} do not fit its mu "
                        f"{stats.mu.shape}: write it again with --save-ref")
    scale = np.abs(feats).max() + 1e-12  # its mu is its feats' mean, as --save-ref writes it
    if not (isinstance(extractor, dict) and isinstance(extractor.get("features"), str)
            and np.isfinite(feats).all() and np.abs(feats.mean(0) - stats.mu).max() < 1e-3 * scale):
        raise UserError(f"{path}: its feats, mu and extractor are not what --save-ref writes "
                        f"together: write it again with --save-ref")
    return Reference(f"features {path}", stats=stats, feats=feats, extractor=extractor,
                     read_at=read_at)


def _from_data(data_cfg: DataConfig, suffix: str = "") -> Reference:
    data = load_images(data_cfg)
    return Reference(data.source + suffix, images=data.images, labels=data.labels)


def _extract(extractor: fx.Extractor, images: torch.Tensor, what: str, progress: bool):
    from tqdm import tqdm

    with tqdm(total=len(images), desc=f"{extractor.name} features ({what})", unit="img",
              dynamic_ncols=True, disable=not progress) as bar:
        return extractor(images, progress=bar.update)


def cached_features(extractor: fx.Extractor, images: torch.Tensor, log,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    key = hashlib.sha256(images.numpy().tobytes()
                         + json.dumps(extractor.identity(), sort_keys=True).encode())
    path = cache_dir() / f"ref_{key.hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return z["feats"].astype(np.float64), (z["logits"].astype(np.float64)
                                                   if "logits" in z.files else None)
    log(f"extracting {extractor.name} features of {len(images)} reference images "
        f"(cached for next time)")
    feats, logits = _extract(extractor, images, "reference", progress)
    arrays = {"feats": feats.astype(np.float32)}
    if logits is not None:
        arrays["logits"] = logits.astype(np.float32)
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    # the cache holds float32: return the same rounding, so a cached rerun gives identical numbers
    return tuple(None if a is None else a.astype(np.float64)
                 for a in (arrays["feats"], arrays.get("logits")))


def build_extractor(name: str, ref: Reference, inception_weights: str | None, device: torch.device,
                    log) -> fx.Extractor:
    if name == "inception":
        return fx.inception(inception_weights, device)
    if name == "efficientnet":
        return fx.efficientnet(device)
    if ref.images is None:
        raise UserError(f"--features classifier trains on labelled reference images, "
                        f"and the reference, {ref.description}, holds no images: "
                        f"give a run or --ref data.path=... instead")
    if not ref.labels:
        raise UserError(f"--features classifier trains on the reference's labels, and the "
                        f"reference, {ref.description}, has no labels: use --features inception "
                        f"or efficientnet, or a labelled reference (class subfolders, an .npz with "
                        f"*_labels, or --ref data.labels=CSV beside --ref data.path=...)")
    return fx.classifier(ref.images, ref.labels, cache_dir(), log)


def _refuse_other_features(ref: Reference, extractor: fx.Extractor, side: int, gen) -> None:
    """Saved reference features (--save-ref) serve only the extractor and the size they were
    made with: references are read at the generated images' size."""
    if ref.extractor is not None and ref.extractor != extractor.identity():
        raise UserError(f"{ref.description} holds {ref.extractor['features']} features made with "
                        f"other weights or preprocessing than --features {extractor.name} "
                        f"uses here: recompute it with --save-ref")
    if ref.read_at not in (None, side):
        raise UserError(f"{ref.description} holds features of images read at {ref.read_at}x"
                        f"{ref.read_at}, and {gen} holds {side}x{side} images: recompute it with "
                        f"--save-ref from this size")


def evaluate(gen: str | Path, refs: list[str], metrics: tuple[str, ...] = ("fid", "kid", "pr"),
             features: str = "inception", *, inception_weights: str | None = None,
             device: str = "cpu", log=print, progress: bool = False,
             save_ref: str | Path | None = None) -> dict:
    _check_options(metrics, features, save_ref)
    t0 = time.perf_counter()
    gen_images, _ = read_generated(gen)
    if len(gen_images) < 2:
        raise UserError(f"{gen} holds {len(gen_images)} image: the metrics compare distributions, "
                        f"so generate more (thousands for a stable FID)")
    ref = _checked_reference(resolve_reference(refs, gen_images.shape[-1], gen), features)
    if ref.images is not None and ref.images.shape[1] != gen_images.shape[1]:
        log(f"note: {'gray' if gen_images.shape[1] == 1 else 'colour'} images compared with "
            f"{'gray' if ref.images.shape[1] == 1 else 'colour'} references, both as RGB, so "
            f"colour alone sets them apart (compare in gray: --ref data.path=... data.channels=1)")
        ref.images, gen_images = fx.to_rgb(ref.images), fx.to_rgb(gen_images)
    _note_one_class(Path(gen), ref, log)
    extractor = build_extractor(features, ref, inception_weights, torch.device(device), log)
    side = gen_images.shape[-1]
    _refuse_other_features(ref, extractor, side, gen)  # before minutes of extraction
    gen_feats, gen_logits = _extract(extractor, gen_images, "generated", progress)
    if ref.images is not None:
        ref_feats, _ = cached_features(extractor, ref.images, log, progress)
        ref_stats = FeatureStats.from_features(ref_feats)
        if save_ref:  # `--ref FILE` then takes it for every metric
            ref_stats.save(save_ref, feats=ref_feats.astype(np.float32), extractor=np.asarray(
                json.dumps(extractor.identity(), sort_keys=True)), read_at=np.asarray(side))
            log(f"wrote reference features {save_ref}")
    elif save_ref:
        raise UserError("--save-ref needs reference images (a folder, data.path=... or a run), "
                        "not a statistics file")
    else:
        if set(metrics) & {"kid", "pr"} and ref.feats is None:
            raise UserError("KID and precision/recall need reference features: "
                            "give the reference data, or a file written by --save-ref, "
                            "not mu/sigma statistics")
        ref_feats, ref_stats = ref.feats, ref.stats
    gen_stats = FeatureStats.from_features(gen_feats)
    for what, count in (("generated", len(gen_feats)), ("reference", ref_stats.n)):
        if "fid" in metrics and count is not None and count < gen_feats.shape[1]:
            log(f"note: {count} {what} images for {gen_feats.shape[1]}-dimensional features: "
                f"their covariance is rank-deficient, so the Frechet distance is biased upward "
                f"and noisy; compare only numbers made with the same counts, and use at least "
                f"{gen_feats.shape[1]} for a stable one")
    if gen_stats.mu.shape != ref_stats.mu.shape:
        raise UserError(f"reference statistics have {ref_stats.mu.shape[0]} dimensions, "
                        f"{extractor.name} features {gen_stats.mu.shape[0]}: "
                        f"they come from another extractor")

    values: dict[str, float] = {}
    if "fid" in metrics:
        values["fid" if extractor.comparable_with_published_fid else "fd"] = \
            frechet_distance(gen_stats.mu, gen_stats.sigma, ref_stats.mu, ref_stats.sigma)
    if "kid" in metrics:
        values["kid"], values["kid_std"] = kid(
            ref_feats, gen_feats, subset_size=min(1000, len(gen_feats), len(ref_feats)))
    if "pr" in metrics:
        values["precision"], values["recall"] = precision_recall(ref_feats, gen_feats)
    if "is" in metrics and gen_logits is not None:
        probs = torch.from_numpy(gen_logits).softmax(-1).numpy()
        splits = max(1, min(10, len(probs) // 2))  # a split of one image scores exactly 1
        values["inception_score"], values["inception_score_std"] = inception_score(probs, splits)
        if len(probs) < 50_000:  # each split's p(y) estimated from few images: biased low
            log(f"note: an Inception Score from {len(probs)} images ({splits} splits) is lower "
                f"than from the usual 50,000 (10 splits of 5,000); compare only scores made with "
                f"the same count")
    result = {"written_by": "ddpmkit eval", "gen": str(gen), "num_gen": len(gen_images),
              "ref": ref.description,
              "num_ref": len(ref.images) if ref.images is not None else ref.stats.n,
              **extractor.identity(), "metrics": values}
    if extractor.name == "classifier" and gen_logits is not None:
        result["classifier"] = _class_report(gen_logits, extractor.class_names)
    result["gen_sha256"] = hashlib.sha256(gen_images.numpy().tobytes()).hexdigest()
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["ddpmkit"], result["date"] = version(), time.strftime("%Y-%m-%d %H:%M:%S")
    return result


def _note_one_class(gen: Path, ref: Reference, log) -> None:
    """One class's samples against every class's images: the distance measures the gap between
    the class and the rest too."""
    made = {row.get("label", "") for _, row in manifest_images(gen, "file")}
    classes = set(ref.labels or [])
    if len(made) == 1 and "" not in made and len(classes) > 1:
        label = made.pop()
        log(f"note: every generated image is of class {label}, and the reference holds "
            f"{len(classes)} classes: the distance counts that difference too (against that "
            f"class's images: --ref data.filter_label={label})")


def _check_options(metrics: tuple[str, ...], features: str, save_ref) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})"
                        if unknown else
                        f"--metrics names no metric: give some of {', '.join(METRICS)}")
    if "is" in metrics and features == "classifier":
        raise UserError("--metrics is: the Inception Score needs ImageNet classes "
                        "(--features inception or efficientnet); with --features classifier the "
                        "result reports the confident share and class entropy instead")
    if save_ref and features == "classifier":
        raise UserError("--save-ref with --features classifier: that classifier is trained on "
                        "the reference images, which a features file cannot give back; "
                        "pass the reference itself (--ref) each time")
    target = Path(save_ref) if save_ref else None
    if target and (target.is_dir() or target.exists() and not _saved_features(target)):
        what = "a folder" if target.is_dir() else "a file ddpmkit did not write"
        raise UserError(f"--save-ref {save_ref}: is {what}, which it would replace: give a new "
                        f"file's name")


def _saved_features(path: Path) -> bool:
    """A features file an earlier --save-ref wrote (one to replace)."""
    return {"feats", "extractor", "read_at", "mu", "sigma"} <= (_npz_arrays(path) or set())


def _checked_reference(ref: Reference, features: str) -> Reference:
    if ref.images is not None and len(ref.images) < 2:
        raise UserError(f"{ref.description} holds {len(ref.images)} image: the metrics compare "
                        f"distributions, so give a reference of many images")
    if ref.extractor is not None and ref.extractor["features"] != features:
        raise UserError(f"{ref.description} holds {ref.extractor['features']} features: add "
                        f"--features {ref.extractor['features']}, or recompute it with --save-ref")
    return ref


def _class_report(logits: np.ndarray, names: list[str]) -> dict:
    probs = torch.from_numpy(logits).softmax(-1).numpy()
    pred = probs.argmax(1)
    shares = np.bincount(pred, minlength=len(names)) / len(pred)
    nz = shares[shares > 0]
    return {"confident_share": float((probs.max(1) > CONFIDENCE).mean()),
            "class_entropy": abs(float(-(nz * np.log(nz)).sum() / np.log(len(names)))),
            "class_shares": {name: round(float(s), 4) for name, s in zip(names, shares)}}


SAME_EVALUATION = ("gen_sha256", "ref", "num_ref", "features", "preprocessing", "weights_sha256")


def write_result(result: dict, out: str | Path | None) -> tuple[Path, dict]:
    """Write the result's JSON; an earlier result there of the same images, reference and extractor
    keeps the metrics this one did not compute (a later --metrics is run adds IS to an earlier
    fid,kid,pr result).
    Returns the path and what it holds."""
    path = Path(out) if out else Path(result["gen"]) / f"eval_{result['features']}.json"
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        earlier = None
    if isinstance(earlier, dict) and isinstance(earlier.get("metrics"), dict) and all(
            earlier.get(k) == result[k] for k in SAME_EVALUATION):
        result = {**result, "metrics": {**earlier["metrics"], **result["metrics"]}}
    write_about_images({path: atomic.json_text(result)}, "ddpmkit eval")
    return path, result


def format_table(result: dict) -> str:
    lines = [f"{result['num_gen']} generated vs {result['num_ref']} reference images "
             f"({result['ref']})",
             f"features: {result['features']}" + ("" if result["comparable_with_published_fid"]
                                                  else " (not comparable with published FID)")]
    for key, value in result["metrics"].items():
        lines.append(f"  {key:<22} {value:.4f}")
    for key, value in result.get("classifier", {}).items():
        if not isinstance(value, dict):
            lines.append(f"  {key:<22} {value:.4f}")
    return "\n".join(lines)


class TrainingEvaluator:
    """Periodic evaluation inside a training run: Frechet distance (and, for the classifier, the
    confident share and class balance) of generated images against the training images."""

    def __init__(self, features: str, images: torch.Tensor, labels: list[str] | None,
                 device: torch.device, log=print):
        ref = Reference("training data", images=images, labels=labels)
        self.extractor = build_extractor(features, ref, None, device, log)
        self.ref = FeatureStats.from_features(cached_features(self.extractor, images, log)[0])

    def __call__(self, gen_u8: torch.Tensor) -> dict:
        feats, logits = self.extractor(gen_u8)
        s = FeatureStats.from_features(feats)
        out = {"fd": frechet_distance(s.mu, s.sigma, self.ref.mu, self.ref.sigma),
               "features": self.extractor.name, "weights": self.extractor.weights_sha256[:12],
               "images": len(gen_u8)}
        if self.extractor.name == "classifier":
            report = _class_report(logits, self.extractor.class_names)
            out.update(confident_share=report["confident_share"],
                       class_entropy=report["class_entropy"])
        return out
