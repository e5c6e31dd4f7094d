"""`ddpmkit balance`: top up the classes of a labelled dataset with generated images.

How many each class needs (`plan`):
  - default: every class up to the largest one;
  - `target` with one or more classes: each named class's final count;
  - `proportions`: the smallest balanced dataset with those class shares that keeps every real
    image (nothing is ever removed), rounded to whole images.

Output (`balance`):
    OUT/classes/<class>/          one standard `ddpmkit sample` folder per class topped up
                                  (individual/, grids/, manifest.csv; resumable like any job)
    OUT/manifest.csv              real images (their original paths, synthetic=false) and generated
                                  ones (paths relative to OUT, synthetic=true), one schema; with
                                  --drop-copies a nearest column, with --select score and reason,
                                  with --from-real varies
    OUT/selection.csv, .json      with --select: every candidate's score and the choice per class
    OUT/by_class/<class>/         with by_class_folders: symlinks to all of a class's images

With `from_real` (--from-real STRENGTH), generated image k of a class is a variation of the
class's real image k mod n (in the manifest's order): forward-noised to STRENGTH and denoised
towards the class (SDEdit), instead of sampled from pure noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .atomic import FolderLock
from .config import SampleConfig, class_name
from .data import ImageData, labelling_digest, load_images, resize_center_crop
from .errors import UserError
from .generation import (MANIFEST_COLUMNS, MAX_GUIDANCE, Anchors, SamplingSpec, finished_rows,
                         generate, keys_asked, no_unconditional_model, sample_batch)
from .images import to_uint8, upsample
from .limits import MAX_IMAGES_PER_JOB
from .metrics.memorization import is_copy
from .outputs import (RECORD, SAMPLE_WRITES, Kind, OutputFolder, about_images, existing, matching,
                      read_manifest, read_record, refuse_special, sample_files, write_manifest)
from .pixels import read_image
from .run import Run, RunDir
from .runtime import mix_seed
from .selection import (CLOSE_TO_REAL, SelectOptions, Selector, auto_scale, build_selector,
                        next_count, validation_images)

AUTO_SCALES, PROBE = (1.0, 1.5, 2.0, 3.0, 4.0), 128  # --class-guidance auto


def plan(counts: dict[str, int], target: int | None = None, class_labels: Sequence[str] = (),
         proportions: dict[str, float] | None = None) -> dict[str, int]:
    """Images to generate per class (every class of `counts` listed, 0 where none)."""
    if proportions is not None and (target is not None or class_labels):
        raise UserError("--proportions sets every class's share; "
                        "--target and --class set the named classes' counts: use one")
    class_labels = [class_name(name).strip() for name in class_labels]
    if target is not None or class_labels:
        if target is None or not class_labels:
            raise UserError("--target and --class go together: the final count of each class "
                            "named (--class A --class B ...)")
        for name in class_labels:
            if name not in counts:
                raise UserError(f"--class {name}: not a class of the data ({', '.join(counts)})")
            if target < counts[name]:
                raise UserError(f"--target {target} is below the {counts[name]} real images "
                                f"of {name}; balancing never removes images")
        return {c: (target - n if c in class_labels else 0) for c, n in counts.items()}
    if proportions is not None:
        unknown = sorted(set(proportions) - set(counts))
        if unknown:
            raise UserError(f"--proportions names {', '.join(unknown)}: "
                            f"not a class of the data ({', '.join(counts)})")
        shares = {c: proportions.get(c, 0.0) for c in counts}
        # shares rounded as people write them (thirds as 0.333) are taken as meant
        negative = [c for c, p in shares.items() if p < 0]
        if negative:
            raise UserError(f"--proportions {negative[0]}={shares[negative[0]]:g}: a share must "
                            f"not be negative")
        if abs(sum(shares.values()) - 1.0) > 1e-3:
            raise UserError(f"--proportions must sum to 1, got {sum(shares.values()):g}")
        shares = {c: p / sum(shares.values()) for c, p in shares.items()}
        stuck = [c for c, p in shares.items() if p == 0 and counts[c] > 0]
        if stuck:
            raise UserError(f"--proportions gives {stuck[0]} no share but it has "
                            f"{counts[stuck[0]]} real images; balancing never removes images")
        # the smallest total keeping all images
        total = max(counts[c] / p for c, p in shares.items() if p > 0)
        return {c: max(0, round(p * total) - counts[c]) for c, p in shares.items()}
    largest = max(counts.values())
    return {c: largest - n for c, n in counts.items()}


def parse_proportions(text: str) -> dict[str, float]:
    return _class_values(text, "--proportions", "class=share", "benign=0.5,malignant=0.5")


def parse_class_guidance(text: str) -> dict[str, float]:
    return _class_values(text, "--class-guidance", "class=scale", "benign=1,malignant=3")


# a class name may hold "," or "=": a pair ends at the first "=value" followed by "," or the end
_PAIR = re.compile(r"(?P<name>.+?)=(?P<value>[^,=]*)(?:,|$)")


def _class_values(text: str, flag: str, what: str, example: str) -> dict[str, float]:
    out, at = {}, 0
    while at < len(text):
        pair = _PAIR.match(text, at)
        name = class_name(pair["name"]).strip() if pair else ""
        if name in out:
            raise UserError(f"{flag} names {name} twice: give each class once")
        try:
            value = float(pair["value"]) if name else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"{flag} takes {what} pairs like {example}, "
                            f"got {(pair[0] if pair else text[at:]).rstrip(',')!r}")
        out[name], at = value, pair.end()
    return out


def class_guidance(scales: dict[str, float], classes: list[str],
                   default: float) -> dict[str, float]:
    """The guidance scale of each class: --class-guidance's, else sample.guidance."""
    unknown = sorted(set(scales) - set(classes))
    if unknown:
        raise UserError(f"--class-guidance names {', '.join(unknown)}: not a class of the run "
                        f"({', '.join(classes)})")
    bad = [c for c, s in scales.items() if not 0 < s <= MAX_GUIDANCE]
    if bad:  # before any class's images are made: not when its turn comes
        raise UserError(f"--class-guidance {bad[0]}={scales[bad[0]]:g}: use a scale above 0 "
                        f"(guidance 0 would label unconditional samples as the class; 1 is the "
                        f"conditional model alone) and at most {MAX_GUIDANCE:g}")
    return {c: scales.get(c, default) for c in classes}


def _refuse_unbalanceable(run: Run, sample_cfg: SampleConfig, guidance, select) -> None:
    """A run or options balance cannot use: refused before anything is read or written."""
    if not run.config.model.class_conditional:
        raise UserError(f"{run.path} is not class-conditional: "
                        f"train with model.class_conditional=true to balance")
    if RunDir(run.path).imported_from():
        raise UserError(f"{run.path} is an imported model with no training data of its own "
                        f"to balance: fine-tune it on your labelled data first "
                        f"(--init-from {run.path})")
    if guidance == "auto" and select is None:
        raise UserError("--class-guidance auto chooses each class's scale with the selector: "
                        "add --select")
    if guidance == "auto" and run.config.train.label_dropout == 0:
        raise UserError(f"--class-guidance auto: {no_unconditional_model(run)}; leave "
                        f"--class-guidance out")
    if sample_cfg.guidance == 0:
        raise UserError("balance with sample.guidance=0 would label unconditional samples "
                        "as classes: use guidance 1 or more")


def balance(run: Run, sample_cfg: SampleConfig, out: str | Path, *, target: int | None = None,
            class_labels: Sequence[str] = (), proportions: dict[str, float] | None = None,
            by_class_folders: bool = False, log=print, progress: bool = True, amp_dtype=None,
            fresh: bool = False, force: bool = False, asked: set[str] | None = None, copies=None,
            guidance: dict[str, float] | str | None = None,
            select: SelectOptions | None = None,
            from_real: float | None = None) -> dict[str, int]:
    """Generate what `plan` asks for with the run's class-conditional model; returns the plan.
    `guidance`: a scale per class (--class-guidance), or "auto" (chosen with the selector);
    `select`: keep only candidates the selector recognises (selection.py), generating more up to a
    limit; `from_real`: vary the class's real images at this strength (the module's docstring)."""
    reads = (Path(run.config.data.path),) if run.config.data.path else ()
    refuse_special(Path(out), reads, BALANCE.what)  # before anything is read
    _refuse_unbalanceable(run, sample_cfg, guidance, select)
    asked = keys_asked(run, sample_cfg, asked)
    spec = SamplingSpec.from_config(sample_cfg).checked(run, asked)  # before any image is read
    if from_real is not None:
        Anchors.check(from_real, spec)
    recorded = RunDir(run.path)  # its data must still hold only images it trained on
    data = (recorded.training_set() if recorded.digests_path.is_file()
            else load_images(run.config.data))
    added = sorted(set(data.labels) - set(run.config.data.class_names))
    if added:
        raise UserError(f"{run.config.data.path} now has class(es) {', '.join(added[:3])} that "
                        f"{run.path} was not trained on: balance tops up the classes its generator "
                        f"learned; train again on the data as it is now")
    counts = Counter(data.labels)
    counts = {c: counts.get(c, 0) for c in run.config.data.class_names}
    _refuse_relabelled(recorded, counts, data, run.config.data)
    need = plan(counts, target, class_labels, proportions)
    for c in [c for c in need if need[c] > MAX_IMAGES_PER_JOB]:  # before any class is generated
        raise UserError(f"balance would generate {need[c]:,} {c} images, more than ddpmkit's "
                        f"limit of {MAX_IMAGES_PER_JOB:,} for one job: ask for fewer (--target, "
                        f"--proportions)")
    for c in [c for c in counts if not counts[c] and need[c]]:
        log(f"balance: warning: {run.path} trained on no image of {c}: its generated {c} images "
            f"show only what the model learnt of it elsewhere (--init-from), if anything")
    anchors = _anchors(data, need, from_real)
    scales = (None if guidance == "auto"
              else class_guidance(guidance or {}, list(counts), sample_cfg.guidance))
    for c in [c for c in (guidance if isinstance(guidance, dict) else {}) if not need[c]]:
        log(f"balance: warning: --class-guidance {c}=... is not used: no {c} image is generated")
    selector = None if select is None else build_selector(
        run.config.data, data.images, data.labels, list(counts), select.check(), log,
        val=validation_images(recorded, select.validation, list(counts), log)
        if select.validation else None)
    columns = (MANIFEST_COLUMNS + (["nearest"] if copies else [])
               + (["score", "reason"] if selector else []) + (["varies"] if from_real else []))
    out = Path(out)
    if not force:  # before anything is deleted: a class job would refuse them halfway through
        _refuse_foreign_class_files(out, fresh)
    with OutputFolder(out, BALANCE, {"run": str(run.path.resolve()), "seed": sample_cfg.seed,
                                     "from_real": from_real}, fresh, force, reads):
        log("balance: " + "; ".join(f"{c}: {counts[c]} real + {need[c]} generated" for c in counts))
        rows = [[path, i, "", "", "", "", label, "false"] + [""] * (len(columns) - 8)
                for i, (path, label) in enumerate(zip(data.origins(), data.labels))]
        folders = class_folders(list(counts), _existing_class_folders(out))
        _say_left_out(out, folders, need, log)
        topping = TopUp(run, out, log, selector, select, fresh, progress=progress,
                        amp_dtype=amp_dtype, asked=asked, copies=copies, force=force)
        for position, (name, num) in enumerate(need.items()):
            if num:
                cfg = dataclasses.replace(
                    sample_cfg, out_dir=str(out / "classes" / folders[name]), num=num,
                    class_label=name, gif=False,
                    seed=mix_seed(sample_cfg.seed, position))  # classes do not share noise
                scale = scales[name] if scales else topping.choose_guidance(cfg, anchors[name])
                made = topping.add(dataclasses.replace(cfg, guidance=scale), anchors[name])
                rows += _naming_varied(made, data, name) if anchors[name] else made
        topping.write_records()
        write_manifest(out / "manifest.csv", rows, columns)
        _unlink_by_class(out)  # links of an earlier run may name images this manifest no longer has
        if by_class_folders and _link_by_class(out, rows, folders):
            log("balance: by_class/ links the generated images only: the real ones are elements "
                "of an array, with no file of their own (manifest.csv names them)")
    log(f"balance: wrote {out}/manifest.csv ({len(rows)} images, "
        f"{len(rows) - len(data.labels)} generated)")
    return need


def _refuse_relabelled(recorded: RunDir, counts: dict[str, int], data: ImageData,
                       data_cfg) -> None:
    """Images counted under other labels than training counted them (a labels CSV edited since):
    the plan would top up classes as the generator never learned them."""
    trained = recorded.meta().get("class_counts")
    changed = [c for c in counts if isinstance(trained, dict) and trained.get(c) != counts[c]]
    if changed:
        c = changed[0]
        raise UserError(f"{data_cfg.labels or data_cfg.path} now gives {counts[c]} image(s) of "
                        f"{c}, and {recorded.path} trained on {trained.get(c)}: its labels "
                        f"changed since training; restore them, or train again on the data as "
                        f"it is now")
    labelled = recorded.meta().get("labels_sha256")
    if labelled is not None and labelled != labelling_digest(data.digests, data.labels):
        raise UserError(f"{data_cfg.labels or data_cfg.path} now gives some images other labels "
                        f"than {recorded.path} trained on (the counts per class are the same): "
                        f"its labels changed since training; restore them, or train again on "
                        f"the data as it is now")


def _anchors(data, need: dict[str, int], strength: float | None) -> dict[str, Anchors | None]:
    """Each class's real images to vary (--from-real), or None per class (pure noise)."""
    if strength is None:
        return dict.fromkeys(need)
    empty = [c for c in need if need[c] and c not in data.labels]
    if empty:
        raise UserError(f"--from-real: the run trained on no {empty[0]} image to vary; leave "
                        f"--from-real out, or leave {empty[0]} out (--proportions, --target)")
    return {c: Anchors(data.images[[i for i, label in enumerate(data.labels) if label == c]],
                       strength) if need[c] else None for c in need}


def _naming_varied(rows: list[list], data, name: str) -> list[list]:
    """--from-real: each generated row with the real image it varies (image k: the class's k mod n,
    in the order `_anchors` took them)."""
    origins = [o for o, label in zip(data.origins(), data.labels) if label == name]
    return [row + [origins[int(row[1]) % len(origins)]] for row in rows]


class TopUp:
    """Each class's images: one sampling job per class; with a selector, candidates scored and
    the job extended until enough pass or the limit is reached."""

    def __init__(self, run: Run, out: Path, log, selector: Selector | None,
                 options: SelectOptions | None, fresh: bool, **generating):
        self.run, self.out, self.log, self.fresh, self.generating = run, out, log, fresh, generating
        self.selector, self.options = selector, options
        self.candidates: list[list] = []  # OUT/selection.csv
        self.summary: dict[str, dict] = {}  # OUT/selection.json
        self.probes: dict[str, dict] = {}  # --class-guidance auto: fidelity per scale

    def choose_guidance(self, cfg: SampleConfig, anchors: Anchors | None = None) -> float:
        """--class-guidance auto: probe each scale of AUTO_SCALES with PROBE images (their own
        seed) and take selection.auto_scale's choice; an earlier run of this job that probed with
        the same generator, sampling settings and selector is not probed again."""
        spec, name = SamplingSpec.from_config(cfg), cfg.class_label
        if anchors:
            spec = anchors.checked(spec, self.run.schedule.num_timesteps)
        settings = {k: v for k, v in dataclasses.asdict(spec).items() if k != "guidance"}
        probed_with = {**settings,
                       "checkpoint_sha256": self.run.checkpoint_sha256, "ema": self.run.ema,
                       "seed": cfg.seed, "selector": self.selector.digest(name),
                       "from_real": anchors and anchors.identity}
        earlier = _earlier_probe(self.out, name)
        if earlier.get("probed_with") == probed_with:
            self.probes[name] = earlier
            fidelity = {float(s): r for s, r in earlier["fidelity"].items()}
            return self._say_choice(name, fidelity, earlier["chosen"], "the earlier run's ")
        fidelity, passing = {}, {}
        for scale in AUTO_SCALES:
            x = sample_batch(self.run, range(PROBE), mix_seed(cfg.seed, PROBE),
                             dataclasses.replace(spec, guidance=scale), anchors=anchors)
            fidelity[scale], passing[scale] = self.selector.fidelity(self._as_scored(x, cfg), name)
        real = self.selector.real_fidelity[name]
        chosen = auto_scale(fidelity, real)
        self.probes[name] = {"fidelity": fidelity, "pass_rates": passing, "real_fidelity": real,
                             "real_pass": self.selector.real_pass[name], "chosen": chosen,
                             "probed_with": probed_with}
        return self._say_choice(name, fidelity, chosen, "")

    def _as_scored(self, x: torch.Tensor, cfg: SampleConfig) -> torch.Tensor:
        """Probe images as candidates are scored: written at --size, read back at the run's."""
        if not cfg.size:
            return to_uint8(x)
        return resize_center_crop(to_uint8(upsample(x, cfg.size)), self.run.config.data.image_size)

    def _say_choice(self, name: str, fidelity: dict[float, float], chosen: float,
                    whose: str) -> float:
        real = self.selector.real_fidelity[name]
        self.log(f"select: {name}: guidance {chosen:g} ({whose}probe class fidelity "
                 + ", ".join(f"{s:g}: {r:.0%}" for s, r in fidelity.items())
                 + f"; real images {real:.0%})")
        if real < 0.5:
            self.log(f"select: warning: the selector assigns only {real:.0%} of real {name} "
                     f"images to {name}, so it cannot judge which scale makes better {name} "
                     f"images: guidance {chosen:g} is a default, not a measurement; give the class "
                     f"a scale (--class-guidance {name}=SCALE) or more real images")
        elif fidelity[chosen] < CLOSE_TO_REAL * real:
            self.log(f"select: warning: at every scale fewer generated {name} images look like "
                     f"{name} to the selector ({fidelity[chosen]:.0%} at best) than real ones "
                     f"({real:.0%}): the generator has not learnt this class; train it longer "
                     f"(train.class_balance helps a rare class) before relying on these images")
        return chosen

    def _generate(self, cfg: SampleConfig, first: bool,
                  anchors: Anchors | None) -> dict[int, list[str]]:
        varied = (f" (varying its {len(anchors.images)} real one(s) at strength "
                  f"{anchors.strength:g})" if anchors else "")
        self.log(f"balance: generating {cfg.num} image{'s' * (cfg.num != 1)} of {cfg.class_label} "
                 f"into {cfg.out_dir}{varied}")
        # a job extended for more candidates keeps its images: --fresh applies to its first call
        generate(self.run, cfg, log=self.log, **self.generating,
                 fresh=self.fresh and first, anchors=anchors)
        return finished_rows(Path(cfg.out_dir))

    def _row(self, folder: str, row: list[str]) -> list:
        """A class job's manifest row, its file relative to OUT."""
        return [(Path(folder) / row[0]).relative_to(self.out).as_posix(), *row[1:]]

    def add(self, cfg: SampleConfig, anchors: Anchors | None = None) -> list[list]:
        """The manifest rows of the class's kept images."""
        need = cfg.num
        if self.selector is None:
            finished = self._generate(cfg, True, anchors)
            return [self._row(cfg.out_dir, r) for k, r in sorted(finished.items()) if k < need]
        name, limit = cfg.class_label, max(need, math.ceil(need * self.options.max_candidates))
        threshold, made, scores = self.selector.thresholds[name], need, {}
        while True:
            finished = self._generate(dataclasses.replace(cfg, num=made), not scores, anchors)
            new = [k for k in range(made) if k not in scores]
            images = torch.stack([read_image(Path(cfg.out_dir) / finished[k][0]) for k in new])
            size = self.run.config.data.image_size
            scores.update(zip(new, self.selector.scores(resize_center_crop(images, size), name)))
            near = self._near_copies(finished, made)
            passed = [k for k in range(made) if scores[k] >= threshold and k not in near]
            if len(passed) >= need or made >= limit:
                break
            made = next_count(made, len(passed), need, limit)
        return self._keep(cfg, threshold, scores, passed, finished, near=near)

    def _near_copies(self, finished: dict[int, list[str]], made: int) -> set[int]:
        """Candidates --drop-copies left near-copies (its redraws ran out): never kept."""
        copies = self.generating.get("copies")
        if copies is None:
            return set()
        d1 = np.array([float(finished[k][-1]) for k in range(made)])  # the nearest column
        return set(np.flatnonzero(is_copy(d1, copies.calibration.threshold)).tolist())

    def _keep(self, cfg: SampleConfig, threshold: float, scores: dict[int, float],
              passed: list[int], finished: dict[int, list[str]], *,
              near: set[int]) -> list[list]:
        name, need, made = cfg.class_label, cfg.num, len(scores)
        if not passed:
            raise UserError(
                f"--select: none of {made} candidates of {name} scored {threshold:.10g} or more "
                f"(best {max(scores.values()):.10g})"
                + (f" that is not a near-copy of a training image ({len(near)} are)" if near
                   else "") + ": lower --select-threshold or "
                "--select-quantile (which needs validation images: --select-val), raise "
                "--max-candidates, or train the generator longer "
                "(train.class_balance helps a rare class)")
        kept = set(passed[:need])
        # scores written as precisely as the threshold, so each row's comparison reads true
        reasons = {k: (f"score {scores[k]:.10g} >= {threshold:.10g}" if k in kept else
                       "beyond the number needed" if k in passed else
                       "a near-copy of a training image" if k in near else "below the threshold")
                   for k in range(made)}
        for k in range(made):
            self.candidates.append([name, *self._row(cfg.out_dir, finished[k])[:3],
                                    f"{scores[k]:.10g}", str(k in kept).lower(), reasons[k]])
        self.summary[name] = {"needed": need, "candidates": made, "passed": len(passed),
                              "kept": len(kept), "acceptance_rate": len(passed) / made,
                              "threshold": threshold}
        self.log(f"select: {name}: {len(passed)} of {made} candidates passed "
                 f"({len(passed) / made:.0%}); kept {len(kept)} of the {need} needed"
                 + ("" if len(kept) == need else
                    f": {need - len(kept)} short at the limit (--max-candidates)"))
        return [self._row(cfg.out_dir, finished[k])
                + [f"{scores[k]:.10g}", reasons[k]]
                for k in sorted(kept)]

    def write_records(self) -> None:
        """OUT/selection.csv (every candidate: score, kept, why) and OUT/selection.json (per
        class: candidates, acceptance rate, threshold)."""
        if self.selector is None:  # an earlier run's, with --select: not this manifest's
            for path in _selection_records(self.out):
                path.unlink()
            return
        write_manifest(self.out / "selection.csv", self.candidates, SELECTION_COLUMNS)
        classes = {c: {**s, **({"auto_guidance": self.probes[c]} if c in self.probes else {})}
                   for c, s in self.summary.items()}
        atomic.write_text(self.out / "selection.json", atomic.json_text(
            {"calibrated_on": self.selector.calibrated_on, "classes": classes,
             "tuned_on_sha256": sorted(self.selector.tuned_on),
             "tuned_on_size": self.run.config.data.image_size}))


SELECTION_COLUMNS = ["class", "file", "index", "seed", "score", "kept", "reason"]
_SELECTION_HEADS = {"selection.csv": ",".join(SELECTION_COLUMNS).encode(),
                    "selection.json": b'{\n "calibrated_on": '}


def _selection_records(out: Path) -> list[Path]:
    """OUT's selection.csv and selection.json as balance --select writes them (a user's file of
    the same name is not one: it is neither replaced nor deleted)."""
    return [path for path in existing(out, _SELECTION_HEADS) if path.is_file()
            and not path.is_symlink() and atomic.head(path, 40).startswith(
                _SELECTION_HEADS[path.name])]


def _earlier_probe(out: Path, name: str) -> dict:
    """The --class-guidance auto probe of class `name` that OUT/selection.json records, or {}."""
    try:
        summary = atomic.read_json(out / "selection.json")
        probe = summary["classes"][name]["auto_guidance"]
        fidelity = {float(s): float(r) for s, r in probe["fidelity"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return probe if set(fidelity) == set(AUTO_SCALES) and probe.get("chosen") in AUTO_SCALES else {}


_LINK = re.compile(r"(real|synthetic)_\d{7,}\.\w+")  # what _link_by_class names its links


def _balance_files(out: Path) -> list[Path]:
    """A balanced set's own files: each class's sampling job, its links and its manifest, and what
    audit and eval wrote about them."""
    files = []
    for record in sorted(out.glob(f"classes/*/{RECORD}")):
        files += [*sample_files(record.parent), record, record.parent / FolderLock.NAME]
    links = [p for p in out.glob("by_class/*/*") if p.is_symlink() and _LINK.fullmatch(p.name)]
    own = existing(out, ("manifest.csv",)) + _selection_records(out) + about_images(out)
    return [*files, *links, *own]


def _refuse_foreign_class_files(out: Path, fresh: bool) -> None:
    """Files in OUT/classes/<class>/ no sampling job of this set made, where that class's job
    will refuse them: in a folder without a job record, or in any once --fresh has removed the
    records."""
    own = set(_balance_files(out))
    for folder in sorted(p for p in out.glob("classes/*") if p.is_dir() and not p.is_symlink()):
        if (folder / RECORD).is_file() and not fresh:
            continue
        foreign = [p for p in sorted(folder.rglob("*"))
                   if (p.is_symlink() or p.is_file()) and p not in own
                   and not atomic.is_temporary(p) and p.name != FolderLock.NAME]
        over = [p for p in foreign if re.fullmatch(SAMPLE_WRITES, p.relative_to(folder).as_posix())]
        if over:  # --force would not help: the class's job writes there
            raise UserError(f"{over[0]} is not a file ddpmkit wrote, and this balance job would "
                            f"write over it: move it out of {folder}, or choose another --out")
        if foreign:
            raise UserError(f"{foreign[0]} is not a file ddpmkit wrote: move it out of "
                            f"{folder}, or add --force to write beside it (ddpmkit never deletes "
                            f"it)")


BALANCE = Kind("balance", "balance job", "balanced set", "files no ddpmkit balance wrote there",
               _balance_files,
               matching(rf"manifest\.csv|selection\.(csv|json)|by_class/[^/]+/{_LINK.pattern}"
                        rf"|classes/[^/]+/({SAMPLE_WRITES})"))  # its sampling jobs' too


def _safe(name: str) -> str:
    """A class name as a folder name (no separators, nothing hidden, well inside the 255 bytes a
    file system allows: a longer name is cut and told apart by its digest)."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).lstrip(".")
    if len(cleaned.encode()) > 100:
        cut = cleaned.encode()[:80].decode("utf-8", "ignore")
        cleaned = f"{cut}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return cleaned or "_"


def class_folders(names: list[str], existing: dict[str, str] | None = None) -> dict[str, str]:
    """A folder name per class, distinct even where two names clean to the same one ('x y' and
    'x_y') or differ only in case (one folder on macOS and Windows): the later class, in the run's
    class order, gets its position appended. `existing` (class -> folder, from an earlier balance in
    the same --out) is kept, so a rerun finds its folders."""
    folders = {name: folder for name, folder in (existing or {}).items() if name in names}
    taken = {folder.lower() for folder in folders.values()}
    for position, name in enumerate(names):
        if name in folders:
            continue
        folder = _safe(name)
        while folder.lower() in taken:
            folder = f"{folder}-{position}"
        taken.add(folder.lower())
        folders[name] = folder
    return {name: folders[name] for name in names}


def _existing_class_folders(out: Path) -> dict[str, str]:
    """class -> folder of the class jobs an earlier balance left in OUT/classes
    (their records say)."""
    found = {}
    for record in sorted((out / "classes").glob(f"*/{RECORD}")):
        label = (read_record(record.parent) or {"job": {}})["job"].get("class_label")
        if isinstance(label, str):
            found.setdefault(label, record.parent.name)
    return found


def _say_left_out(out: Path, folders: dict[str, str], need: dict[str, int], log) -> None:
    """A rerun with another plan writes the manifest of that plan: say which images of an earlier
    plan it leaves out (kept on disk, so a later plan that asks for them again resumes)."""
    for name, folder in folders.items():
        manifest = out / "classes" / folder / "manifest.csv"
        if not need[name] and manifest.is_file():
            log(f"balance: {manifest.parent} holds {len(read_manifest(manifest))} generated "
                f"{name} images of an earlier plan that this one does not ask for: left out of "
                f"the manifest, kept on disk (--fresh removes them)")


def _unlink_by_class(out: Path) -> None:
    """Remove the links `_link_by_class` made (and folders they leave empty); nothing else."""
    root = out / "by_class"
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.is_dir() and not folder.is_symlink():
            for link in folder.iterdir():
                if link.is_symlink() and _LINK.fullmatch(link.name):
                    link.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    if not any(root.iterdir()):
        root.rmdir()


def _link_by_class(out: Path, rows: list[list], folders: dict[str, str]) -> int:
    """Link every image into by_class/CLASS/; returns how many real ones had no file to link."""
    root, unlinked = out / "by_class", 0
    for i, row in enumerate(rows):
        path, label = row[0], row[MANIFEST_COLUMNS.index("label")]
        synthetic = row[MANIFEST_COLUMNS.index("synthetic")] == "true"  # columns may follow it
        if not synthetic and not Path(path).is_file():  # an array element: array.npz#12
            unlinked += 1
            continue
        target = out / path if synthetic else Path(path)
        folder = root / folders[label]
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / (f"synthetic_{i:07d}{target.suffix}" if synthetic
                         else f"real_{i:07d}{target.suffix}")
        os.symlink(os.path.relpath(target, folder), link)
    return unlinked
