"""`ddpmkit <command>`: parses arguments, builds the config, calls the library. Nothing else.

Every config key can be set as `section.key=value`; the everyday flags set exactly one key each
(listed in TRAIN_FLAGS and SAMPLE_FLAGS, so `--help` and the README stay true).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from .config import EVAL_FEATURES, data_config, load_config, parse_override, updated
from .errors import UserError, escape_controls, warn
from .metrics.memorization import REDRAWS
from .runtime import version
from .samplers import SAMPLERS, SPACINGS

TRAIN_FLAGS = {  # flag -> config key
    "data": "data.path", "out": "train.out_dir", "image_size": "data.image_size",
    "batch_size": "train.batch_size", "steps": "train.max_steps",
    "max_minutes": "train.max_minutes", "lr": "train.lr", "seed": "train.seed",
    "device": "train.device", "init_from": "train.init_from",
}
# downstream: set for every real source (its flags name the paths, labels and splits)
STUDY_DATA_KEYS = ("data.image_column", "data.label_column", "data.on_error", "data.bit_depth")
SAMPLE_FLAGS = {
    "num": "sample.num", "sampler": "sample.sampler", "steps": "sample.steps", "eta": "sample.eta",
    "seed": "sample.seed", "batch_size": "sample.batch_size", "size": "sample.size",
    "checkpoint": "sample.checkpoint", "out": "sample.out_dir", "device": "sample.device",
    "spacing": "sample.spacing", "class_label": "sample.class_label", "guidance": "sample.guidance",
}
BALANCE_FLAGS = {"guidance": "sample.guidance", "seed": "sample.seed"}

TRAIN_EXAMPLES = """examples:
  ddpmkit train                                  # bundled digits, defaults, runs/default
  ddpmkit train configs/mnist.yaml data.path=/data/mnist train.batch_size=64
  ddpmkit train --data ./my_images --image-size 64 --out runs/lesions
  ddpmkit train configs/lesions.yaml train.grad_accum=4 train.activation_checkpointing=true
  ddpmkit train configs/cifar10.yaml --max-batch   # largest micro-batch on this GPU, then exit
  torchrun --nproc-per-node 8 -m ddpmkit train configs/cifar10.yaml   # the same global batch
  ddpmkit train configs/lesions.yaml --init-from runs/cifar10-pretrained train.lr=1e-5
rerunning the same command resumes from the latest checkpoint (under torchrun too)."""

SAMPLE_EXAMPLES = """examples:
  ddpmkit sample runs/default --num 64 --sampler ddim --steps 50 --seed 0 --out samples/
  ddpmkit sample runs/lesions --num 5900 --sampler dpmpp-2m --steps 20 --out gen/
  ddpmkit sample runs/lesions --num 5900 --sampler ddpm --size 128 --out big/   # all T steps
  torchrun --nproc-per-node 4 -m ddpmkit sample runs/lesions -n 50000 --out gen50k/
an interrupted job rerun with the same command skips the images it already wrote.
under torchrun write -n or --num-images: torchrun's parser takes --num for its --numa-binding."""

EVAL_EXAMPLES = """examples:
  ddpmkit eval samples/ --ref real_images/                  # a folder of real images
  ddpmkit eval samples/ --ref runs/mnist                    # the run's own training data
  ddpmkit eval samples/ --ref data.path=/data/mnist --save-ref stats/mnist_inception.npz
  ddpmkit eval samples/ --ref stats/mnist_inception.npz --metrics fid,kid,pr
  ddpmkit eval samples/ --ref runs/mnist --features classifier     # trained on the labels
  ddpmkit eval samples/ --ref runs/mnist --features efficientnet   # offline; not FID
FID needs the standard Inception weights: --inception-weights FILE, or the torch hub cache."""

IMPORT_EXAMPLES = """examples:
  ddpmkit import path/to/ddpm-cifar10-32 --out runs/cifar10   # a diffusers folder
  ddpmkit import google/ddpm-cifar10-32 --out runs/cifar10    # a hub id (huggingface_hub)
only what ddpmkit's UNet computes exactly is imported; any other option is refused by name."""

EXPORT_EXAMPLES = """examples:
  ddpmkit export runs/lesions --format diffusers --out lesions-diffusers/   # DDPMPipeline"""

BALANCE_EXAMPLES = """examples:
  ddpmkit balance runs/lesions --out balanced/              # every class up to the largest
  ddpmkit balance runs/lesions --target 6274 --class malignant --out balanced/
  ddpmkit balance runs/derm --target 300 --class df --class vasc --out balanced/
  ddpmkit balance runs/lesions --proportions benign=0.5,malignant=0.5 --out balanced/
  ddpmkit balance runs/lesions --select --class-guidance malignant=2 --out balanced/
  ddpmkit balance runs/lesions --from-real 0.2 --out balanced/   # variations of the real ones
  ddpmkit balance runs/lesions --select --select-val data.labels=val.csv --out balanced/
needs a class-conditional run (model.class_conditional=true); reads the run's own training data."""

RESTORE_EXAMPLES = """examples:
  ddpmkit denoise runs/mnist noisy/ --sigma auto --out clean/   # or --sigma 0.2 on [0, 1]
  ddpmkit denoise runs/mnist noisy/ --sigma 0.2 --method sample --samples 4 --out clean/
  ddpmkit img2img runs/lesions inputs/ --strength 0.5 --out variants/   # SDEdit
  ddpmkit inpaint runs/mnist images/ --mask masks/ --out filled/  # RePaint; white = fill
images are read with the model's channels (colour made gray or gray colour, as training reads data)
and must have at least its size; larger ones are restored tile by tile (never resized)."""

DOWNSTREAM_EXAMPLES = """examples:
  ddpmkit downstream --real pneumonia.npz --synthetic balanced/ --out study/
  ddpmkit downstream --real lesions/train --test lesions/test --calibration lesions/val \\
      --synthetic balanced/ --out study/
  ddpmkit downstream --real pneumonia.npz --calibration-split val --synthetic balanced/ \\
      --out study/
  ddpmkit downstream --real lesions/ --real-labels train.csv --test-labels test.csv \\
      --synthetic balanced/ --out study/ data.image_column=isic_id   # a CSV per split"""

AUDIT_EXAMPLES = """examples:
  ddpmkit audit gen/ --ref runs/lesions                          # calibrated leave-one-out
  ddpmkit audit gen/ --ref runs/lesions --holdout lesions/val    # calibrated on held-out images
  ddpmkit audit balanced/ --holdout data.split=val --json       # the run balanced/ names
a generated image is a near-copy when it is closer to a training image than 99% of real images
the generator never saw are (--share 0.01); writes GEN/audit.json and GEN/audit.html."""

GIF_EXAMPLES = """examples:
  ddpmkit gif runs/default        # runs/default/learning.gif from runs/default/grids/"""


# torchrun's own parser claims --num (a prefix of its --numa-binding), so under torchrun use these.
ALIASES = {"num": ["-n", "--num-images"], "class_label": ["--class"]}


# flags whose values come from a registry: --help lists them as the registry has them
NAMED_VALUES = {"sample.sampler": SAMPLERS, "sample.spacing": SPACINGS}


def _add_flags(p: argparse.ArgumentParser, flags: dict[str, str], types: dict[str, type]) -> None:
    for name, key in flags.items():
        named = f": {', '.join(NAMED_VALUES[key])}" if key in NAMED_VALUES else ""
        p.add_argument(f"--{name.replace('_', '-')}", *ALIASES.get(name, []),
                       dest=name, type=types.get(name, str),
                       default=None, metavar=name.upper(), help=f"sets {key}{named}")


def _command(sub, name: str, helptext: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=helptext, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print only a JSON summary: no table, messages or progress bar")


def _add_fresh_force(p: argparse.ArgumentParser, fresh: str) -> None:
    p.add_argument("--fresh", action="store_true", help=fresh)
    p.add_argument("--force", action="store_true",
                   help="write into a folder that holds files ddpmkit did not write "
                        "(it never deletes them)")


def _add_output_flags(p: argparse.ArgumentParser, fresh: str) -> None:
    p.add_argument("--drop-copies", action="store_true",
                   help="draw again (new noise) every image that nearly copies a training image")
    _add_holdout_flags(p, ", with --drop-copies")
    p.add_argument("--max-redraws", type=int, default=None,
                   help=f"with --drop-copies (default {REDRAWS})")
    _add_fresh_force(p, fresh)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_parser(sub) -> None:
    t = _command(sub, "train", "train (or resume) a model", TRAIN_EXAMPLES)
    t.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]",
                   help="an optional YAML config, then overrides")
    _add_flags(t, TRAIN_FLAGS, {"image_size": int, "batch_size": int, "steps": int,
                                "max_minutes": float, "lr": float, "seed": int})
    t.add_argument("--fresh", action="store_true",
                   help="discard an existing run in --out and start over")
    t.add_argument("--max-batch", action="store_true",
                   help="only find the largest micro-batch that fits in GPU memory "
                        "(and a grad_accum), then exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_json_flag(t)


def _sample_parser(sub) -> None:
    s = _command(sub, "sample", "generate images from a trained run", SAMPLE_EXAMPLES)
    s.add_argument("run", help="run directory (as written by ddpmkit train)")
    s.add_argument("args", nargs="*", metavar="sample.key=value",
                   help="overrides of the sample section")
    _add_flags(s, SAMPLE_FLAGS, {"num": int, "steps": int, "eta": float, "seed": int,
                                 "batch_size": int, "size": int, "guidance": float})
    s.add_argument("--no-ema", action="store_true",
                   help="use the raw weights instead of the EMA (sets sample.ema=false)")
    s.add_argument("--gif", action="store_true",
                   help="also write OUT/trajectory.gif (sets sample.gif=true)")
    _add_output_flags(s, "replace images of an earlier, different job in --out")
    _add_json_flag(s)


def _eval_parser(sub) -> None:
    e = _command(sub, "eval", "FID, KID, precision/recall of generated images against real ones",
                 EVAL_EXAMPLES)
    e.add_argument("gen", help="a sample output folder or any folder of images")
    e.add_argument("--ref", action="extend", nargs="+", required=True, metavar="REF",
                   help="a folder of images, a run directory, a statistics .npz, "
                        "or data.key=value ... (several)")
    e.add_argument("--metrics", default="fid,kid,pr",
                   help="comma-separated: fid, kid, pr, is (default fid,kid,pr)")
    e.add_argument("--features", default="inception", choices=EVAL_FEATURES)
    e.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="pt_inception-2015-12-05-6726825d.pth")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", default=None, help="JSON path (default GEN/eval_<features>.json)")
    e.add_argument("--save-ref", default=None, metavar="FILE.npz",
                   help="also save the reference features (+ mu, sigma) for later --ref FILE, "
                        "KID and P/R included")
    _add_json_flag(e)
    e.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def _model_parsers(sub) -> None:
    i = _command(sub, "info",
                 "architecture, parameters, FLOPs and training memory of a run or config",
                 "examples:\n  ddpmkit info runs/mnist\n"
                 "  ddpmkit info configs/cifar10.yaml --batch-sizes 64,128")
    i.add_argument("target", nargs="?", default=None,
                   help="a run directory or a YAML config (default: the defaults)")
    i.add_argument("args", nargs="*", metavar="section.key=value", help="overrides")
    i.add_argument("--batch-sizes", default="1,8,32,128",
                   help="batch sizes for the memory estimate")
    _add_json_flag(i)
    r = _command(sub, "report", "write RUN/report.html: curves, grids, checkpoints, config",
                 "examples:\n"
                 "  ddpmkit report runs/mnist      # prints the path of runs/mnist/report.html")
    r.add_argument("run", help="run directory")
    g = _command(sub, "gif", "turn a run's periodic training grids into a 'learning' GIF",
                 GIF_EXAMPLES)
    g.add_argument("run", help="run directory")
    g.add_argument("--out", default=None, help="GIF path (default RUN/learning.gif)")
    g.add_argument("--frame-ms", type=int, default=200, help="milliseconds per grid")
    im = _command(sub, "import", "a diffusers UNet2DModel (+ scheduler) as a ddpmkit run",
                  IMPORT_EXAMPLES)
    im.add_argument("source", help="a diffusers pipeline or UNet folder, or a Hugging Face hub id")
    im.add_argument("--out", required=True,
                    help="the run folder to create (must not exist or be empty)")
    ex = _command(sub, "export", "a run's weights as a diffusers DDPMPipeline folder",
                  EXPORT_EXAMPLES)
    ex.add_argument("run", help="run directory")
    ex.add_argument("--format", default="diffusers", choices=["diffusers"],
                    help="only diffusers for now")
    ex.add_argument("--out", required=True,
                    help="the folder to create (must not exist or be empty)")
    ex.add_argument("--checkpoint", default="latest", help="latest, best or a step number")
    ex.add_argument("--no-ema", action="store_true",
                    help="export the raw weights instead of the EMA")


def _balance_parser(sub) -> None:
    b = _command(sub, "balance", "top up a labelled dataset's classes with generated images",
                 BALANCE_EXAMPLES)
    b.add_argument("run", help="a class-conditional run directory")
    b.add_argument("args", nargs="*", metavar="sample.key=value",
                   help="sampling overrides (sampler, steps, guidance...)")
    b.add_argument("--out", required=True)
    b.add_argument("--target", type=int, default=None,
                   help="with --class: the final count of each class named")
    b.add_argument("--class", dest="class_labels", action="append", default=[],
                   help="a class to top up to --target (repeat for several)")
    b.add_argument("--proportions", default=None, help="class=share,... summing to 1")
    b.add_argument("--by-class-folders", action="store_true",
                   help="also OUT/by_class/<class>/ (symlinks)")
    b.add_argument("--class-guidance", default=None, metavar="CLASS=SCALE,...",
                   help="a guidance scale for some classes (the others: --guidance), or auto: "
                        "with --select, each class's smallest scale whose candidates the selector "
                        "recognises nearly as often as real ones")
    _add_flags(b, BALANCE_FLAGS, {"guidance": float, "seed": int})
    b.add_argument("--from-real", type=float, default=None, metavar="STRENGTH",
                   help="make each image a variation of one of its class's real images, noised "
                        "to STRENGTH in (0, 1] and denoised (SDEdit) instead of drawn from noise")
    b.add_argument("--select", action="store_true",
                   help="keep only candidates a classifier of the real images recognises as "
                        "their class, generating more up to --max-candidates")
    b.add_argument("--select-quantile", type=float, default=None,
                   help="with --select: a class's threshold is this quantile of its real "
                        "validation images' scores (default 0.05)")
    b.add_argument("--select-threshold", type=float, default=None,
                   help="with --select: one threshold for every class instead")
    b.add_argument("--select-val", default=None, metavar="DATA",
                   help="with --select: the labelled validation images (a folder or file, or "
                        "data.key=value, e.g. data.labels=val.csv; default: the data's val split)")
    b.add_argument("--max-candidates", type=float, default=None,
                   help="with --select: at most this many times a class's need (default 4)")
    _add_output_flags(b, "replace the images of an earlier, different balance in --out")


def _add_holdout_flags(p: argparse.ArgumentParser, use: str) -> None:
    p.add_argument("--holdout", default=None, metavar="DATA",
                   help="real images the generator never saw: a folder, array or IDX file, or "
                        "data.key=value words changing the run's own data (data.split=val; "
                        f"data.labels=val.csv){use}; without it, the "
                        "training set's leave-one-out distances set the copy threshold")
    p.add_argument("--drop-overlap", action="store_true",
                   help="with --holdout: leave out its images that are training images of the run "
                        "(else they are refused)")


def _audit_parser(sub) -> None:
    a = _command(sub, "audit", "are generated images copies of training images? (memorization)",
                 AUDIT_EXAMPLES)
    a.add_argument("gen", help="a sample or balance output folder, or any folder of images")
    a.add_argument("--ref", help="the run that generated them (default: the run GEN's records "
                                 "name, for a sample or balance output)")
    _add_holdout_flags(a, "")
    a.add_argument("--share", type=float, default=0.01,
                   help="the share of held-out images that would be flagged (default 0.01)")
    a.add_argument("--features", default="auto",
                   choices=("auto", "efficientnet", "classifier", "none"),
                   help="the feature space searched beside pixels: auto is efficientnet where "
                        "installed, else a classifier of the run's labelled images")
    _add_json_flag(a)


def _downstream_parser(sub) -> None:
    d = _command(sub, "downstream", "does a synthetic set help a classifier? "
                 "(real vs real+synthetic vs oversampling)", DOWNSTREAM_EXAMPLES)
    d.add_argument("args", nargs="*", metavar="data.key=value",
                   help=f"for every labels CSV and real image read: {', '.join(STUDY_DATA_KEYS)}")
    d.add_argument("--synthetic", required=True, help="a ddpmkit balance output folder")
    d.add_argument("--out", required=True)
    for name, what, default in (
            ("real", "the labelled real training data (any data.path)", "train"),
            ("test", "the real test data (default: --real's test split)", "test"),
            ("calibration", "held-out labelled real images on which each classifier's "
                            "per-class thresholds are also tuned (default: --real's val "
                            "split where it has one, else none)", "val")):
        d.add_argument(f"--{name}", required=name == "real", default=None, metavar="PATH",
                       help=what)
        d.add_argument(f"--{name}-labels", default=None, metavar="CSV",
                       help=f"a CSV naming the {name} images and their labels "
                            f"(as data.labels for train)")
        d.add_argument(f"--{name}-split", default="train" if name == "real" else None,
                       metavar="SPLIT", help=f"the split of the {name} data (default: {default}); "
                                             f"only for data with splits")
    d.add_argument("--seeds", type=int, default=3)
    d.add_argument("--steps", type=int, default=1500,
                   help="optimizer steps per classifier (the same in every arm)")
    d.add_argument("--no-augment", action="store_true",
                   help="train every arm without random shifts and flips")
    d.add_argument("--synthetic-share", type=float, default=None,
                   help="in the arms with generated images, the fraction of a topped-up "
                        "class's draws that are generated (default: every image equally "
                        "often); choose it on a validation split")
    d.add_argument("--unverified", action="store_true",
                   help="run even if the generator cannot be checked for leakage")
    _add_fresh_force(d, "replace the study of other settings in --out (only its own results)")


def _restore_parsers(sub) -> None:
    for kind, helptext in (("denoise", "remove Gaussian noise from images with a trained model"),
                           ("img2img", "variations of images (SDEdit): noise to --strength, "
                                       "then denoise"),
                           ("inpaint", "fill the white part of each mask (RePaint)")):
        rp = _command(sub, kind, helptext, RESTORE_EXAMPLES)
        rp.add_argument("run", help="run directory")
        rp.add_argument("inputs", help="a folder of images of the model's size or larger (tiled)")
        rp.add_argument("--out", required=True,
                        help="output folder: individual/, grid.png, manifest.csv")
        rp.add_argument("--seed", type=int, default=0)
        rp.add_argument("--quiet", action="store_true", help="no messages")
        rp.add_argument("--batch-size", type=int, default=64,
                        help="images (or tiles of a larger image) per network call")
        rp.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: denoise every step below t, img2img "
                             "the sampler's default, inpaint 250)")
        rp.add_argument("--checkpoint", default="latest", help="latest, best or a step number")
        rp.add_argument("--no-ema", action="store_true",
                        help="use the raw weights instead of the EMA")
        rp.add_argument("--device", default="auto")
        _add_fresh_force(rp, "replace the outputs of an earlier, different restoration in --out")
        if kind == "denoise":
            rp.add_argument("--sigma", default="auto",
                            help="noise std on the [0,1] scale, or auto (wavelet estimate)")
            rp.add_argument("--method", default="mmse", choices=["mmse", "sample"],
                            help="mmse: posterior mean, one network call (best PSNR); "
                                 "sample: reverse process")
            rp.add_argument("--samples", type=int, default=1,
                            help="--method sample: draws averaged")
            stochastic = ", ".join(name for name, s in SAMPLERS.items() if s.stochastic)
            rp.add_argument("--sampler", default=None,
                            help=f"--method sample: a stochastic sampler (ddpm unless given), "
                                 f"{stochastic}")
        elif kind == "img2img":
            rp.add_argument("--strength", type=float, default=0.5,
                            help="0 returns the input, 1 ignores it")
            rp.add_argument("--sampler", default="ddim", help=", ".join(SAMPLERS))
        else:
            rp.add_argument("--mask", required=True,
                            help="a folder of masks named like the images (white = fill)")
            rp.add_argument("--jump-length", type=int, default=10)
            rp.add_argument("--resamplings", type=int, default=10)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddpmkit", description="Denoising diffusion models for images: "
                                    "train, sample, evaluate, balance, restore.")
    parser.add_argument("--version", action="version", version=f"ddpmkit {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _sample_parser, _eval_parser, _model_parsers, _balance_parser,
                _downstream_parser, _restore_parsers, _audit_parser):
        add(sub)
    return parser


def _overrides(tokens: list[str], flags: dict[str, str], ns: argparse.Namespace) -> dict:
    out = dict(parse_override(tok) for tok in tokens)
    for name, key in flags.items():
        value = getattr(ns, name)
        if value is not None:
            out[key] = value
    return out


def _silent(*_) -> None:
    pass


def _warnings_only(message: str) -> None:
    """--json's log: stdout holds the JSON alone, and warnings (every one says "warning:") still
    reach the user, on stderr."""
    if "warning:" in message:
        print(message, file=sys.stderr)


def _print_json(obj: dict) -> None:
    from .atomic import json_text

    print(json_text(obj))


def cmd_train(ns: argparse.Namespace) -> None:
    from . import distributed
    from .training import train

    tokens = list(ns.args)
    config_path = tokens.pop(0) if tokens and "=" not in tokens[0] else None
    cfg = load_config(config_path, _overrides(tokens, TRAIN_FLAGS, ns))
    log = _warnings_only if ns.json else print
    if ns.max_batch:
        from .batchprobe import probe

        _print_json(probe(cfg, log=log))
        return
    world = distributed.init_from_env(cfg.train.device, cfg.train.dist_timeout_minutes)
    try:
        run = train(cfg, fresh=ns.fresh, progress=not (ns.quiet or ns.json), log=log, world=world)
    finally:
        distributed.shutdown()
    if ns.json and world.is_main:
        state = run.read_state()
        latest = max(state["checkpoints"], key=lambda e: e["step"])
        done = latest["step"] >= run.config().train.max_steps
        _print_json({"run": str(run.path), "step": latest["step"],
                     "stopped_by": "train.max_steps" if done else "train.max_minutes",
                     "checkpoint": str(run.path / latest["file"]), "best_step": state["best"],
                     "report": str(run.path / "report.html"), "stats": str(run.stats_path)})


def _loaded(run_path: str, overrides: dict, doing: str, world=None):
    """The run's saved config with sample.* overrides -> (the run loaded on its device, the sample
    section, the autocast dtype): what every command that samples a run starts with."""
    from . import distributed
    from .run import RunDir, load_run
    from .runtime import autocast_dtype, compile_network, resolve_device

    bad = [k for k in overrides if not k.startswith("sample.")]
    if bad:
        raise UserError(f"only sample.* keys can be set when {doing}, got {bad[0]}")
    sc = updated(RunDir(run_path).config(), overrides).sample
    device = resolve_device(distributed.device_for(world, sc.device) if world else sc.device)
    amp = autocast_dtype(sc.precision, device)
    run = load_run(run_path, sc.checkpoint, sc.ema, device, dtype=amp)
    if sc.compile:
        run.net = compile_network(run.net, sc.compile_mode, for_sampling=True)
    return run, sc, amp


def _copy_filter(ns: argparse.Namespace, log, written_at: int | None):
    """--drop-copies' filter: the run's training images and a threshold calibrated for them, as
    the audit compares images written at --size (`written_at`)."""
    from .metrics.memorization import CopyFilter, seen_views
    from .run import RunDir

    if not ns.drop_copies:
        if ns.holdout or ns.drop_overlap:
            raise UserError("--holdout and --drop-overlap calibrate --drop-copies: add "
                            "--drop-copies, or leave them out")
        if ns.max_redraws is not None:
            raise UserError("--max-redraws limits --drop-copies: add --drop-copies, or leave it "
                            "out")
        return None
    redraws = REDRAWS if ns.max_redraws is None else ns.max_redraws
    if redraws < 1:
        raise UserError(f"--max-redraws must be at least 1, got {redraws}")
    run = RunDir(ns.run)
    held = run.holdout_images(ns.holdout, ns.drop_overlap, log)
    copies = CopyFilter.calibrated(run.training_images(log), held, redraws=redraws,
                                   views=seen_views(run.config()), written_at=written_at)
    copies.calibration.warn("--drop-copies", log)
    return copies


def cmd_sample(ns: argparse.Namespace) -> None:
    from . import distributed
    from .generation import copy_summary, generate

    overrides = _overrides(ns.args, SAMPLE_FLAGS, ns)
    if ns.no_ema:
        overrides["sample.ema"] = False
    if ns.gif:
        overrides["sample.gif"] = True
    world = distributed.init_from_env(overrides.get("sample.device", "auto"))
    try:
        run, sc, amp = _loaded(ns.run, overrides, "sampling", world)
        log = _silent if not world.is_main else _warnings_only if ns.json else print
        copies = _copy_filter(ns, log, sc.size)
        out = generate(run, sc, fresh=ns.fresh, world=world, amp_dtype=amp,
                       progress=not (ns.quiet or ns.json), log=log, asked=set(overrides),
                       force=ns.force, copies=copies)
        if ns.json and world.is_main:
            _print_json({"out": str(out), "num": sc.num, "images": str(out / "individual"),
                         "manifest": str(out / "manifest.csv"), "checkpoint": run.checkpoint,
                         "sampler": sc.sampler,
                         **({"drop_copies": copy_summary(out, sc.num, sc.seed, copies)}
                            if copies else {})})
    finally:
        distributed.shutdown()


def cmd_eval(ns: argparse.Namespace) -> None:
    from .metrics.evaluate import evaluate, format_table, write_result
    from .runtime import resolve_device

    metrics = tuple(m.strip() for m in ns.metrics.split(",") if m.strip())
    quiet = ns.quiet or ns.json
    result = evaluate(ns.gen, ns.ref, metrics, ns.features, inception_weights=ns.inception_weights,
                      device=str(resolve_device(ns.device)),
                      log=_warnings_only if ns.json else _silent if ns.quiet else print,
                      progress=not quiet, save_ref=ns.save_ref)
    path, result = write_result(result, ns.out)
    _print_json(result) if ns.json else print(f"{format_table(result)}\nwrote {path}")


def cmd_info(ns: argparse.Namespace) -> None:
    from .info import format_info, model_info
    from .run import RunDir

    tokens, target = list(ns.args), ns.target
    if target and "=" in target:  # only overrides were given
        tokens, target = [target, *tokens], None
    overrides = dict(parse_override(tok) for tok in tokens)
    if target and not Path(target).exists():
        raise UserError(f"no run or config at {target}: give a run folder or a YAML config")
    if target and Path(target).is_dir():  # a run's config.yaml holds its source's architecture
        cfg = updated(RunDir(target).config(), {**overrides, "train.init_from": None})
    else:
        cfg = load_config(target, overrides)
    try:
        sizes = tuple(int(b) for b in ns.batch_sizes.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes takes comma-separated positive integers, "
                        f"got {ns.batch_sizes!r}")
    info = model_info(cfg, sizes)
    _print_json(info) if ns.json else print(format_info(info))


def cmd_gif(ns: argparse.Namespace) -> None:
    from . import atomic
    from .outputs import refuse_run_folders
    from .report import learning_gif, training_grids
    from .run import RunDir

    run_dir = RunDir(ns.run)
    if not run_dir.path.is_dir():
        raise UserError(f"run directory not found: {run_dir.path}")
    if not 10 <= ns.frame_ms <= 655_350:  # a GIF stores a frame's delay in 16-bit hundredths
        raise UserError(f"--frame-ms {ns.frame_ms}: a GIF frame lasts 10 to 655350 ms, in steps "
                        f"of 10")
    out = Path(ns.out) if ns.out else run_dir.path / "learning.gif"
    if ns.out and out.is_dir():
        raise UserError(f"--out {ns.out} is a folder: give the GIF's file name, "
                        f"e.g. {out / 'learning.gif'}")
    if out.suffix.lower() != ".gif":
        raise UserError(f"--out {out}: a GIF's name ends in .gif")
    refuse_run_folders(out, "learning.gif")
    owner = out.expanduser().resolve().parent
    if RunDir(owner).is_run() and owner != run_dir.path.resolve():
        raise UserError(f"--out {out} is inside {owner}, another training run, whose files are its "
                        f"own: write {run_dir.path}'s GIF elsewhere, e.g. "
                        f"--out {run_dir.path / 'learning.gif'}")
    if out.is_symlink() or (out.is_file() and atomic.head(out, 4) != b"GIF8"):
        raise UserError(f"{out} is not a GIF: choose another --out (ddpmkit never replaces it)")
    # a data or samples folder: "no training grids" would read as a run that lost them
    if not run_dir.is_run():
        raise UserError(f"{run_dir.path} is not a ddpmkit training run: "
                        f"give the folder `ddpmkit train --out` wrote")
    damaged: list[str] = []
    gif = learning_gif(run_dir, ns.frame_ms, warn=damaged.append)
    if gif is None and damaged:
        raise UserError(damaged[0])  # no grid could be read
    if gif is None and run_dir.imported_from():
        raise UserError(f"{run_dir.path} is an imported model ({run_dir.imported_from()}): "
                        f"it has no training grids")
    if gif is None:
        raise UserError(f"{run_dir.path} has no training grids in {run_dir.grids} "
                        f"(train.sample_every writes them)")
    atomic.write_bytes(out, gif)
    for message in damaged:
        warn(message)
    frames = len(training_grids(run_dir)) - len(damaged)
    print(f"wrote {out} ({frames} training grid{'' if frames == 1 else 's'})")


def cmd_import(ns: argparse.Namespace) -> None:
    from .interop import import_diffusers

    import_diffusers(ns.source, ns.out)


def cmd_export(ns: argparse.Namespace) -> None:
    from .interop import export_diffusers

    export_diffusers(ns.run, ns.out, ns.checkpoint, ema=not ns.no_ema)


def cmd_balance(ns: argparse.Namespace) -> None:
    from .balance import balance, parse_class_guidance, parse_proportions
    from .selection import SelectOptions

    overrides = _overrides(ns.args, BALANCE_FLAGS, ns)
    decided = [k for k in overrides
               if k in ("sample.num", "sample.out_dir", "sample.class_label", "sample.gif")]
    if decided:
        raise UserError(f"balance decides {decided[0]} for each class itself: "
                        f"use --target/--class, --proportions and --out instead")
    given = [(flag, key, value) for flag, key, value in (
        ("--select-quantile", "quantile", ns.select_quantile),
        ("--select-threshold", "threshold", ns.select_threshold),
        ("--max-candidates", "max_candidates", ns.max_candidates),
        ("--select-val", "validation", ns.select_val)) if value is not None]
    if given and not ns.select:
        raise UserError(f"{given[0][0]} sets how --select keeps images: add --select")
    select = (SelectOptions(**{key: value for _, key, value in given}).check() if ns.select
              else None)
    run, sc, amp = _loaded(ns.run, overrides, "balancing")
    balance(run, sc, ns.out, target=ns.target, class_labels=ns.class_labels,
            proportions=parse_proportions(ns.proportions) if ns.proportions else None,
            by_class_folders=ns.by_class_folders, progress=not ns.quiet, amp_dtype=amp,
            fresh=ns.fresh, force=ns.force, asked=set(overrides),
            copies=_copy_filter(ns, print, sc.size),
            guidance=(ns.class_guidance if ns.class_guidance in (None, "auto")
                      else parse_class_guidance(ns.class_guidance)),
            select=select, from_real=ns.from_real)


def _study_source(path: str | None, labels: str | None, real: str, overrides: dict):
    """A real-data source of the study as a data section: a path and, for a CSV-labelled folder, its
    CSV (a CSV without a path names images in --real's folder). None when neither is given."""
    if path is None and labels is None:
        return None
    return data_config({**overrides, "data.path": path or real, "data.labels": labels})


def cmd_downstream(ns: argparse.Namespace) -> None:
    from .downstream import run_study

    overrides = dict(parse_override(tok) for tok in ns.args)
    other = [k for k in overrides if k not in STUDY_DATA_KEYS]
    if other:  # paths, labels and splits have their flags; the study sets the size and channels
        raise UserError(f"downstream takes only {', '.join(STUDY_DATA_KEYS)} as overrides, "
                        f"got {other[0]}: --real, --test, --calibration "
                        f"and their -labels and -split flags name the data")
    sources = {name: _study_source(getattr(ns, name), getattr(ns, f"{name}_labels"),
                                   ns.real, overrides)
               for name in ("real", "test", "calibration")}
    run_study(sources["real"], ns.synthetic, ns.out, test=sources["test"], real_split=ns.real_split,
              test_split=ns.test_split, unverified=ns.unverified,
              calibration=sources["calibration"], calibration_split=ns.calibration_split,
              seeds=ns.seeds, steps=ns.steps, augment=not ns.no_augment,
              synthetic_share=ns.synthetic_share, fresh=ns.fresh, force=ns.force)


RESTORE_OPTIONS = {"denoise": ("sigma", "method", "samples", "sampler"),
                   "img2img": ("strength", "sampler"), "inpaint": ("jump_length", "resamplings")}


def cmd_restore(ns: argparse.Namespace) -> None:
    from .restoration import restore_folder
    from .run import load_run
    from .runtime import resolve_device

    run = load_run(ns.run, ns.checkpoint, not ns.no_ema, resolve_device(ns.device))
    options = {name: getattr(ns, name) for name in RESTORE_OPTIONS[ns.command]}
    if ns.command == "inpaint":
        options["masks_dir"] = ns.mask
    restore_folder(run, ns.command, ns.inputs, ns.out, seed=ns.seed, batch_size=ns.batch_size,
                   steps=ns.steps, fresh=ns.fresh, force=ns.force,
                   log=_silent if ns.quiet else print, **options)


def cmd_audit(ns: argparse.Namespace) -> None:
    from .audit import run_audit

    summary = run_audit(ns.gen, ns.ref, ns.holdout, ns.share, ns.features,
                        drop_overlap=ns.drop_overlap, log=_warnings_only if ns.json else print)
    if ns.json:
        _print_json(summary)


def cmd_report(ns: argparse.Namespace) -> None:
    from .report import write_report

    print(write_report(ns.run))


COMMANDS = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "info": cmd_info,
            "report": cmd_report, "gif": cmd_gif, "import": cmd_import, "export": cmd_export,
            "balance": cmd_balance, "downstream": cmd_downstream,
            "denoise": cmd_restore, "img2img": cmd_restore, "inpaint": cmd_restore,
            "audit": cmd_audit}


DISTRIBUTED = ("train", "sample")  # the commands that split their work among torchrun's processes
RESUMABLE = ("sample", "balance", "denoise", "img2img", "inpaint")  # rerun: finished images kept


# what the user can do about the operating system's errors they cause most
OS_ERROR_FIXES = {
    errno.ENOTDIR: "a part of this path is a file, not a folder: choose another path",
    errno.ENOENT: "check the path",
    errno.EACCES: "you lack permission for it: choose a path you can use, or change its mode",
    errno.EPERM: "you lack permission for it: choose a path you can use, or change its mode",
    errno.EROFS: "that file system is read-only: write somewhere else",
    errno.ENOSPC: "free some space, or write somewhere else, then run the command again",
    errno.EISDIR: "it is a folder: give a file",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after flags: argparse leaves the later ones unparsed.
    ns, rest = parser.parse_known_args(argv)
    takes_overrides = hasattr(ns, "args")
    unknown = [r for r in rest if r.startswith("-") or "=" not in r or not takes_overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if takes_overrides:
        ns.args = list(ns.args) + rest
    try:
        from .distributed import world_size

        if world_size() > 1 and ns.command not in DISTRIBUTED:
            raise UserError(f"ddpmkit {ns.command} runs as one process (only "
                            f"{' and '.join(DISTRIBUTED)} share work under torchrun): run it "
                            f"without torchrun")
        COMMANDS[ns.command](ns)
    except UserError as exc:
        print(f"ddpmkit: error: {escape_controls(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader stopped (| head): exit non-zero, as a cut-off output is,
        devnull = os.open(os.devnull, os.O_WRONLY)  # and keep Python's exit flush from failing
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except OSError as exc:  # a path the user named cannot be read or written
        path = exc.filename2 or exc.filename  # a rename's target: the name the user knows
        where = f"{path}: " if path else ""
        fix = OS_ERROR_FIXES.get(exc.errno, "") if path else ""
        said = escape_controls(f"{where}{exc.strerror or exc}{fix and '; '}{fix}")
        print(f"ddpmkit: error: {said}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = ("" if ns.command not in RESUMABLE else "; rerun without --fresh to resume"
                  if getattr(ns, "fresh", False) else "; rerun the same command to resume")
        print(f"ddpmkit: interrupted{resume}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
