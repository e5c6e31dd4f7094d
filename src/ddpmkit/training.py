"""The training loop.

Every random draw of step s (batch order, timesteps, noise, flips, dropout) comes from seeds
derived from (train.seed, s), so a run resumed from a checkpoint at step s continues exactly as if
it had never stopped: the checkpoint needs only weights, EMA, optimizer state and the step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import resource
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import atomic
from .checkpoint import restore, save_checkpoint
from .config import Config, absolute_path, check_attention_resolutions, differing_keys, read_run_config, to_yaml
from .data import ImageData, batch_to_model, class_order, image_digests, load_images
from .distributed import World, agreed, barrier, device_for, on_main_then_shared
from .errors import UserError
from .finetune import Source, adopt_architecture, load_pretrained
from .generation import sample, sample_batch
from .images import make_grid, png_bytes, scale_for_viewing, to_uint8
from .run import Run, RunDir, recorded_bit_depth
from .runtime import autocast, autocast_dtype, compile_network, environment, mix_seed, resolve_device
from .schedule import Schedule
from .streaming import batch_loader, open_stream
from .unet import UNet, count_parameters


def diffusion_loss(net, schedule: Schedule, prediction: str, x0, t, noise, labels=None) -> torch.Tensor:
    """Simple loss of Ho et al.: MSE between the network output and its target (eps, x0 or v)."""
    x_t = schedule.q_sample(x0, t, noise)
    out = net(x_t, t) if labels is None else net(x_t, t, labels)
    return F.mse_loss(out.float(), schedule.target(prediction, x0, noise, t))


class EpochOrder:
    """Batch indices for step s: a fresh permutation each epoch, seeded by (seed, epoch). It is
    drawn on the CPU (the same on every machine) and moved to `device` once per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
        self.n, self.batch, self.seed, self.device = n, batch_size, seed, device
        self.steps_per_epoch = max(1, n // batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
            reps = math.ceil(self.batch / self.n)  # a dataset smaller than one batch repeats
            perm = torch.cat([torch.randperm(self.n, generator=g) for _ in range(reps)])
            self._epoch, self._perm = epoch, perm.to(self.device)
        return self._perm[i * self.batch:(i + 1) * self.batch]


# What a run folder holds that ddpmkit wrote, besides meta.json; --fresh deletes these and nothing else.
RUN_FILES = ("config.yaml", "state.json", "stats.jsonl", "training_images.sha256", "report.html", "learning.gif")
RUN_FOLDERS = ("checkpoints", "grids", "tensorboard")


def _prepare_run_dir(run: RunDir, cfg: Config, fresh: bool, log) -> Path | None:
    """Decide between a fresh start and a resume; returns the checkpoint to resume from."""
    if run.path.exists() and not run.path.is_dir():
        raise UserError(f"output path {run.path} is a file: choose a folder with --out")
    # a run (it may hold the user's files too, e.g. samples/), or a folder with nothing in it yet
    if not run.is_run() and run.path.is_dir() and not all(
            p.name == ".lock" or atomic.is_temporary(p) for p in run.path.iterdir()):
        raise UserError(f"{run.path} exists and is not a ddpmkit run: choose another --out")
    if fresh:
        if cfg.train.init_from and Path(cfg.train.init_from).expanduser().resolve() == run.path.resolve():
            raise UserError(f"--fresh would delete {run.path}'s checkpoints, which train.init_from starts from: "
                            f"choose another --out")
        for name in RUN_FOLDERS:
            shutil.rmtree(run.path / name, ignore_errors=True)
        for name in RUN_FILES:  # meta.json stays, the run's mark until training replaces it: a fresh
            (run.path / name).unlink(missing_ok=True)  # start that fails before then can be rerun
        return None
    atomic.remove_stale_temps(run.path, run.checkpoints, run.grids)  # from a run killed mid-write
    if not run.config_path.exists():
        return None
    old = read_run_config(run.config_path)
    diff = differing_keys(old, cfg.to_dict())
    if diff:
        from .config import flatten

        a, b = flatten(old), flatten(cfg.to_dict())
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise UserError(f"{run.path} was trained with a different config ({shown}): rerun with --fresh to "
                        f"start over there, or choose another --out")
    if not run.read_state()["checkpoints"]:
        return None  # stopped before its first checkpoint: nothing to resume
    good = run.verified_checkpoints(warn=lambda m: log(f"warning: {m}"))
    if not good:
        raise UserError(f"{run.path}: no intact checkpoint to resume from; rerun with --fresh to start over")
    return run.path / good[0]["file"]


class _StopSignal:
    """SIGTERM or Ctrl-C set a flag; the loop finishes its step, saves a checkpoint and stops, so
    the saved state is never half an optimizer update. A second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def __enter__(self):
        try:
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def _handle(self, signum, _frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: Config, fresh: bool = False, log=print, progress: bool = True, world: World = World()) -> RunDir:
    """Train (or resume) the run in cfg.train.out_dir; returns its RunDir. Under torchrun pass the
    process's `World`: every process trains its share of each batch, rank 0 alone writes files."""
    tc = cfg.train
    # recorded absolute: sampling, eval --ref RUN and balance find the data from any folder
    cfg.data.path, cfg.data.labels = (absolute_path(p) for p in (cfg.data.path, cfg.data.labels))
    device = resolve_device(device_for(world, tc.device))
    amp_dtype = autocast_dtype(tc.precision, device)
    if not world.is_main:
        log, progress = (lambda *_: None), False
    share = tc.batch_size // (world.size * tc.grad_accum)  # images per process per micro-batch
    if share * world.size * tc.grad_accum != tc.batch_size:
        raise UserError(f"train.batch_size={tc.batch_size} does not split into {world.size} process(es) x "
                        f"train.grad_accum={tc.grad_accum} equal micro-batches: make it a multiple of "
                        f"{world.size * tc.grad_accum}")
    if cfg.data.bit_depth is None and not fresh:  # unset: a resumed run reads its data as it started
        cfg.data.bit_depth = recorded_bit_depth([tc.out_dir]) if RunDir(tc.out_dir).is_run() else None
    data = open_stream(cfg.data) if cfg.data.stream else load_images(cfg.data)
    if cfg.data.bit_depth is None:  # recorded in config.yaml, so sampling, balance and eval read the data alike
        cfg.data.bit_depth = data.bit_depth
    if data.skipped:
        log(f"skipped {len(data.skipped)} unreadable image(s), e.g. {data.skipped[0][0]}: {data.skipped[0][1]}")
    if cfg.model.in_channels is None:
        cfg.model.in_channels = data.channels
    elif cfg.model.in_channels != data.channels:
        fix = f"set data.channels={cfg.model.in_channels} or drop" if cfg.model.in_channels in (1, 3) else "drop"
        raise UserError(f"model.in_channels={cfg.model.in_channels} but the data has {data.channels} channel(s): "
                        f"{fix} model.in_channels")

    class_ids = _class_ids(cfg, data) if cfg.model.class_conditional else None
    source = None
    if tc.init_from:
        source = Source(tc.init_from, log)
        adopt_architecture(cfg, source.config, log)
    if fresh or not RunDir(tc.out_dir).config_path.is_file():  # a new model (a resumed one keeps its layout)
        check_attention_resolutions(cfg)

    # before anything is written: a refusal here (unlabelled data for the classifier judge, missing
    # feature weights) leaves no half-made run behind
    evaluator = _evaluator(cfg, data, device, log) if tc.eval_every and world.is_main else None
    run = RunDir(tc.out_dir)
    lock = _RunLock(run.path) if world.is_main else contextlib.nullcontext()
    with lock:
        return _train(cfg, fresh, log, progress, world, run, data, class_ids, source, device, amp_dtype, share,
                      evaluator)


class _RunLock:
    """One training per run directory: a second `ddpmkit train` into the same --out (a duplicate
    job, a forgotten terminal) would interleave checkpoints and state. An advisory flock on
    RUN/.lock, released by the OS however the holder ends (even kill -9)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import fcntl

        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output path {self.path} is a file: choose a folder with --out")
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise UserError(f"another ddpmkit train is writing to {self.path}: wait for it, stop it, "
                            f"or choose another --out") from None
        return self

    def __exit__(self, *exc):
        self.file.close()
        if not RunDir(self.path).is_run():  # refused before it began: leave the folder as it was
            (self.path / ".lock").unlink(missing_ok=True)
            if self.created and not any(self.path.iterdir()):
                self.path.rmdir()


def _train(cfg, fresh, log, progress, world, run, data, class_ids, source, device, amp_dtype, share,
           evaluator) -> RunDir:
    tc = cfg.train
    # rank 0 decides between a fresh start and a resume; the others learn the outcome (or its error)
    resume_from = on_main_then_shared(world, lambda: _prepare_run_dir(run, cfg, fresh, log))

    torch.manual_seed(tc.seed)
    model = UNet(cfg.model, cfg.data.image_size).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    channels_last = device.type == "cuda" and tc.channels_last
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if channels_last:
        model, ema = model.to(memory_format=torch.channels_last), ema.to(memory_format=torch.channels_last)
    # Fused AdamW (CPU and CUDA) takes a found_inf flag: a non-finite step is skipped on the device,
    # so the step never waits for the host to read the loss.
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    schedule = Schedule.from_config(cfg.diffusion)

    step = 0
    if resume_from is not None:
        step = restore(resume_from, model, ema, opt)["step"]
        log(f"resuming {run.path} from step {step} ({resume_from.name})")
        if world.is_main:
            _truncate_stats(run, step)
            _record_training_images(run, data, log)
    else:
        pretrained = load_pretrained(model, ema, source, log) if source else None
        if pretrained:
            log(f"starting from {pretrained}; optimizer and step start from zero")
        if world.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            _truncate_stats(run, 0)  # an attempt that died before its first checkpoint starts over
            meta = {"environment": environment(device), "data": data.source, "num_images": len(data),
                    "skipped_images": [f for f, _ in data.skipped], "parameters": count_parameters(model),
                    "processes": world.size, "init_from": pretrained}
            atomic.write_text(run.meta_path, json.dumps(meta, indent=1))  # the mark of a run, first
            atomic.write_text(run.config_path, to_yaml(cfg))
            run.digests_path.unlink(missing_ok=True)
            _record_training_images(run, data, log)
    log(f"training {run.path}: {count_parameters(model):,} parameters, {data.source}, on {device}"
        + (f" x {world.size} processes" if world.size > 1 else "")
        + (f", {tc.grad_accum} micro-batches of {share} per step" if tc.grad_accum > 1 else ""))
    if step >= tc.max_steps:
        log(f"{run.path} is already trained to step {step} (train.max_steps={tc.max_steps})")
        return run

    model.activation_checkpointing = tc.activation_checkpointing
    net = model
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp = net if world.size > 1 else None
    if cfg.model.compile:
        net = compile_network(net, cfg.model.compile_mode)

    # This process's rows of each global batch: rank r takes [r*A*share, (r+1)*A*share), A micro-batches.
    mine = slice(world.rank * tc.grad_accum * share, (world.rank + 1) * tc.grad_accum * share)
    if cfg.data.stream:
        order = EpochOrder(len(data), tc.batch_size, tc.seed)
        loader = iter(batch_loader(data, order, mine, step, tc.max_steps, cfg.data.workers, device.type == "cuda"))
        next_images = lambda: next(loader).to(device, non_blocking=True)  # noqa: E731
    else:
        images = data.images.to(device)
        order = EpochOrder(len(data), tc.batch_size, tc.seed, device)
        next_images = lambda: images[order.indices(step)[mine]]  # noqa: E731

    if class_ids is not None:
        class_ids = class_ids.to(device)
        label_order = order if not cfg.data.stream else EpochOrder(len(data), tc.batch_size, tc.seed, device)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    # Counters live on the device and are read at log intervals only (no host sync per step).
    loss_sum, skipped_sum = torch.zeros((), device=device), torch.zeros((), device=device)
    nonfinite_run, worst_run = torch.zeros((), device=device), torch.zeros((), device=device)
    ckpt_loss_sum, ckpt_loss_n, skipped_total = 0.0, 0, 0
    t_start = t_log = time.time()
    step_at_log = step
    bar = _progress(progress, step, tc.max_steps)
    board = _tensorboard(run) if tc.tensorboard and world.is_main else None
    # built before step 0, so data or weights it cannot use stop the run now, not at its first checkpoint
    model.train()

    with _StopSignal() as stop:
        while step < tc.max_steps:
            # --- one optimizer step; every random draw seeded by (seed, step), for the whole global batch ---
            g = torch.Generator(device).manual_seed(mix_seed(tc.seed, step, 2))
            torch.manual_seed(mix_seed(tc.seed, step, 3, world.rank))  # dropout
            flips = torch.rand(tc.batch_size, device=device, generator=g) < 0.5 if cfg.data.hflip else None
            t = torch.randint(0, schedule.num_timesteps, (tc.batch_size,), device=device, generator=g)
            noise = torch.randn((tc.batch_size, *data_shape(cfg)), device=device, generator=g)
            labels = None
            if class_ids is not None:  # dropped labels (-1) train the unconditional model guidance needs
                dropped = torch.rand(tc.batch_size, device=device, generator=g) < tc.label_dropout
                labels = torch.where(dropped, -1, class_ids[label_order.indices(step)])[mine]
            for group in opt.param_groups:
                group["lr"] = tc.lr * min(1.0, (step + 1) / max(1, tc.warmup_steps))
            batch_u8 = next_images()
            loss = torch.zeros((), device=device)
            opt.zero_grad(set_to_none=True)
            for k in range(tc.grad_accum):
                rows = slice(mine.start + k * share, mine.start + (k + 1) * share)
                x0 = batch_to_model(batch_u8[k * share:(k + 1) * share], None if flips is None else flips[rows])
                if channels_last:
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                # DDP all-reduces gradients on the last micro-batch only
                sync = contextlib.nullcontext() if ddp is None or k == tc.grad_accum - 1 else ddp.no_sync()
                with sync:
                    with autocast(device, amp_dtype):
                        micro_labels = None if labels is None else labels[k * share:(k + 1) * share]
                        micro_loss = diffusion_loss(net, schedule, cfg.diffusion.prediction, x0, t[rows], noise[rows],
                                                    micro_labels)
                    micro_loss = micro_loss / tc.grad_accum
                    (scaler.scale(micro_loss) if scaler else micro_loss).backward()
                loss = loss + micro_loss.detach()
            if scaler:
                scaler.unscale_(opt)
            gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            finite = (torch.isfinite(loss) & torch.isfinite(gnorm)).float()
            if world.size > 1:  # a NaN on any process skips the step on all of them
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            if scaler:
                scaler.step(opt)  # skips steps with inf gradients itself
                scaler.update()
            else:
                opt.found_inf = 1.0 - finite
                opt.step()
            with torch.no_grad():
                decay = min(tc.ema_decay, (1 + step) / (10 + step))  # EMA warmup
                # ema += w * (params - ema), w a device tensor (0 on a skipped step): foreach_lerp_
                # would take w as a Python scalar, reading it back from the GPU every step.
                delta = torch._foreach_sub(params, ema_params)
                torch._foreach_mul_(delta, (1.0 - decay) * finite)
                torch._foreach_add_(ema_params, delta)
                # Every process holds the same weights after the all-reduce, so each updates its own EMA
                # identically: no communication, and any rank could save it.
                loss_sum += loss.nan_to_num(0.0, 0.0, 0.0) * finite
                skipped_sum += 1.0 - finite
                nonfinite_run.mul_(1.0 - finite).add_(1.0 - finite)
                torch.maximum(worst_run, nonfinite_run, out=worst_run)
            step += 1

            # --- bookkeeping at intervals: the only host syncs of the loop ---
            if step % tc.log_every == 0 or step == tc.max_steps:
                n = step - step_at_log
                counters = torch.stack([loss_sum, skipped_sum, worst_run])
                if world.size > 1:
                    torch.distributed.all_reduce(counters)
                    counters /= world.size
                total_loss, skipped, worst = counters.tolist()
                skipped, worst = round(skipped), round(worst)
                loss_sum.zero_(), skipped_sum.zero_(), worst_run.copy_(nonfinite_run)
                skipped_total += skipped
                if worst >= tc.max_nonfinite:
                    bar.close()
                    raise UserError(f"training diverged: {worst} non-finite losses in a row by step {step}; "
                                    f"last good checkpoint kept in {run.checkpoints}; lower train.lr")
                mean_loss = total_loss / (n - skipped) if n > skipped else float("nan")
                if math.isfinite(mean_loss):
                    ckpt_loss_sum, ckpt_loss_n = ckpt_loss_sum + mean_loss * n, ckpt_loss_n + n
                now = time.time()
                ips = n * tc.batch_size / max(now - t_log, 1e-9)
                record = {"step": step, "images_seen": step * tc.batch_size, "loss": mean_loss,
                          "lr": opt.param_groups[0]["lr"], "images_per_sec": ips,
                          "sec_per_kimg": 1000 / ips, "memory_mb": _memory_mb(device),
                          "elapsed_sec": now - t_start, "skipped_nonfinite": skipped_total}
                if world.is_main:
                    with open(run.stats_path, "a") as f:
                        f.write(atomic.json_text(record, indent=None) + "\n")
                if board:
                    for key in ("loss", "lr", "images_per_sec", "memory_mb"):
                        board.add_scalar(f"train/{key}", record[key], step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
                t_log, step_at_log = now, step
                bar.update(n)
            out_of_time = tc.max_minutes > 0 and time.time() - t_start > tc.max_minutes * 60
            # one process alone must never stop: under torchrun they agree at log intervals
            out_of_time, stopping = agreed(world, [out_of_time, bool(stop.requested)], at=step % tc.log_every == 0)
            done = step == tc.max_steps or out_of_time or stopping
            # The checkpoint first: a signal's grace period (often 30 s) is for it, not for samples.
            checkpointed = step % tc.checkpoint_every == 0 or done
            if checkpointed:
                if world.is_main:
                    mean_loss = ckpt_loss_sum / ckpt_loss_n if ckpt_loss_n else float("nan")  # none logged yet
                    _save(run, model, ema, opt, step, mean_loss, tc.keep_last)
                barrier()
                ckpt_loss_sum, ckpt_loss_n = 0.0, 0
            if (step % tc.sample_every == 0 or done) and not stopping:
                if world.is_main:
                    grid = _save_grid(run, cfg, ema, schedule, step)
                    if board:
                        board.add_image("samples", grid.numpy(), step)
                barrier()
            if checkpointed and tc.eval_every and (step % tc.eval_every == 0 or done) and not stopping:
                if world.is_main:
                    metrics = _evaluate(run, cfg, ema, schedule, step, evaluator)
                    _record_fd(run, step, metrics["fd"], tc.keep_last)
                    if board:
                        board.add_scalar(f"eval/fd_{metrics['features']}", metrics["fd"], step)
                barrier()
            if done:
                if out_of_time:
                    log(f"stopped at step {step}: train.max_minutes={tc.max_minutes} reached")
                break
    bar.close()
    if board:
        board.close()
    if stopping:  # saved; now leave non-zero, so a scheduler does not take the run as finished
        log(f"stopped at step {step} on {stop.requested or 'a signal'}; checkpoint saved; "
            f"rerun the same command to resume")
        raise KeyboardInterrupt
    if data.skipped:
        log(f"{len(data.skipped)} unreadable image(s) were skipped; they are listed in {run.meta_path}")
    if world.is_main:
        from .report import write_report

        report = write_report(run.path)
        log(f"trained {run.path} to step {step}: checkpoints in {run.checkpoints}, grids in {run.grids}, "
            f"log {run.stats_path}, report {report}")
    return run


def _class_ids(cfg: Config, data) -> torch.Tensor:
    """Class index per image for a class-conditional model; fixes data.class_names and
    model.num_classes in the config (and so in the run's config.yaml)."""
    if not data.labels or any(label is None for label in data.labels):
        raise UserError("model.class_conditional=true needs labels: a CSV (data.labels), class subfolders "
                        "(DATA/<class>/image.png), an .npz with *_labels, or the bundled digits")
    empty = [i for i, label in enumerate(data.labels) if not label.strip()]
    if empty:  # an empty class name would read as "no class" (unconditional) in manifests
        first = Path(data.files[empty[0]]).name if data.files is not None else f"image {empty[0]}"
        raise UserError(f"{len(empty)} image(s) have an empty label ({first} first): give each a class, or leave "
                        f"them out of the labels CSV")
    present = set(data.labels)
    names = cfg.data.class_names or class_order(present)
    unknown = sorted(present - set(names))
    if unknown:
        raise UserError(f"labels {', '.join(unknown[:5])} are not in data.class_names ({', '.join(names[:10])})")
    if cfg.model.num_classes not in (0, len(names)):
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the labels name {len(names)} classes: "
                        f"drop model.num_classes (it is set from the labels)")
    cfg.data.class_names, cfg.model.num_classes = list(names), len(names)
    index = {name: i for i, name in enumerate(names)}
    return torch.tensor([index[label] for label in data.labels])


def data_shape(cfg: Config) -> tuple[int, int, int]:
    return cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size


def _progress(enabled: bool, step: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=step, desc="training", unit="step", dynamic_ncols=True, disable=not enabled)


def _tensorboard(run: RunDir):
    """A TensorBoard writer for RUN/tensorboard (an append-only event log, like stats.jsonl)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run.path / "tensorboard"))


def _record_training_images(run: RunDir, data, log) -> None:
    """Keep RUN/training_images.sha256 (what downstream's leakage guard checks) a record of every
    image the run has trained on: a resume on changed data adds the new images, with a warning."""
    if not isinstance(data, ImageData):  # a streamed dataset is not read whole just for this
        return
    now = set(image_digests(data.images))
    before = set(run.digests_path.read_text().split()) if run.digests_path.exists() else set()
    if now <= before:
        return
    if before:
        log(f"warning: the data changed since {run.path} started ({len(now - before)} image(s) it had not seen): "
            f"training goes on with it, and {run.digests_path.name} now records those too")
    atomic.write_text(run.digests_path, "\n".join(sorted(before | now)) + "\n")


def _evaluator(cfg: Config, data, device, log):
    from .metrics.evaluate import TrainingEvaluator

    if cfg.train.eval_features == "classifier" and not data.labels:
        raise UserError(f"train.eval_every needs labelled training images for train.eval_features=classifier, and "
                        f"{cfg.data.path or 'the data'} has no labels: set train.eval_features=efficientnet or inception")

    if isinstance(data, ImageData):
        return TrainingEvaluator(cfg.train.eval_features, data.images, data.labels, device, log)
    # streamed data: the reference is the first (up to) 10,000 images, read once
    n = min(len(data), 10_000)
    labels = data.labels[:n] if data.labels else None
    return TrainingEvaluator(cfg.train.eval_features, data.read(np.arange(n)), labels, device, log)


def _evaluate(run: RunDir, cfg: Config, ema, schedule: Schedule, step: int, evaluator) -> dict:
    """Sample train.eval_num images with the EMA weights (fixed seed) and score them; logged."""
    view = Run(run.path, cfg, ema, schedule, step, "")
    images = sample(view, num=cfg.train.eval_num, seed=cfg.train.seed, sampler="dpmpp-2m",
                    steps=min(20, schedule.num_timesteps))
    metrics = evaluator(images)
    with open(run.stats_path, "a") as f:
        f.write(atomic.json_text({"step": step, "eval": metrics}, indent=None) + "\n")
    return metrics


def _save(run: RunDir, model, ema, opt, step: int, mean_loss: float, keep_last: int) -> None:
    entries = [e for e in run.read_state()["checkpoints"] if e["step"] != step]
    path = run.checkpoint_file(step)
    try:
        sha = save_checkpoint(path, model, ema, opt, step)
    except OSError as exc:  # disk full, quota, permissions: the temporary file is already removed
        kept = f"checkpoint of step {max(e['step'] for e in entries)} kept" if entries else "no earlier checkpoint"
        raise UserError(f"cannot write checkpoint {path}: {exc.strerror or exc}; {kept}, nothing half-written") from None
    entries.append({"step": step, "file": path.relative_to(run.path).as_posix(), "sha256": sha, "loss": mean_loss})
    _commit_checkpoints(run, entries, keep_last)


def _record_fd(run: RunDir, step: int, fd: float, keep_last: int) -> None:
    """The evaluation of a saved checkpoint, which may make it the best one."""
    entries = run.read_state()["checkpoints"]
    for e in entries:
        if e["step"] == step:
            e["fd"] = fd
    _commit_checkpoints(run, entries, keep_last)


def _commit_checkpoints(run: RunDir, entries: list[dict], keep_last: int) -> None:
    """Name the kept checkpoints and the best one in state.json, then delete the others."""
    # best: lowest evaluation FD when evaluation is on, else lowest mean training loss
    scored = [e for e in entries if "fd" in e]
    # a checkpoint saved before any loss was logged has loss null (NaN in older runs): never "best" by
    # loss, unless no checkpoint has one, when the latest is
    by_loss = [e for e in entries if e["loss"] is not None and math.isfinite(e["loss"])]
    if scored:
        best = min(scored, key=lambda e: e["fd"])["step"]
    else:
        best = min(by_loss, key=lambda e: e["loss"])["step"] if by_loss else max(e["step"] for e in entries)
    keep = {e["step"] for e in sorted(entries, key=lambda e: -e["step"])[:keep_last]} | {best}
    run.write_state({"checkpoints": [e for e in entries if e["step"] in keep], "best": best})
    for e in entries:  # delete only after state.json no longer names them
        if e["step"] not in keep:
            (run.path / e["file"]).unlink(missing_ok=True)


def _save_grid(run: RunDir, cfg: Config, ema, schedule: Schedule, step: int) -> torch.Tensor:
    """Sample the fixed-noise grid (images 0..n-1 of train.seed) with the EMA weights."""
    tc = cfg.train
    view = Run(run.path, cfg, ema, schedule, step, "")
    x = sample_batch(view, list(range(tc.grid_images)), tc.seed, "ddim", min(tc.grid_steps, schedule.num_timesteps))
    grid = scale_for_viewing(make_grid(to_uint8(x)))
    atomic.write_bytes(run.grids / f"step_{step:09d}.png", png_bytes(grid), fsync=False)
    return grid


def _truncate_stats(run: RunDir, step: int) -> None:
    """Drop log lines past the step training restarts from (written after its checkpoint, before
    the crash), and a torn last line."""
    if run.stats_path.exists():
        kept = [row for row in run.read_stats() if row["step"] <= step]
        atomic.write_text(run.stats_path, "".join(atomic.json_text(row, indent=None) + "\n" for row in kept))
