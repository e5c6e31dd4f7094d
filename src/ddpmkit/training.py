"""The training loop.

Every random draw of step s (batch order, timesteps, noise, flips, augmentation, dropout) comes
from seeds derived from (train.seed, s), so a run resumed from a checkpoint at step s continues
exactly as if it had never stopped: the checkpoint needs only weights, EMA, optimizer state, the
step and the loss windows (so the resumed run logs the losses the uninterrupted one would).

`train` resolves the config (resolve.py), checks what can fail, then `_fit` runs the loop: one
screen of phases over one `TrainState`, each phase a small function below it. The run directory's
files are `RunDir`'s (run.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import atomic, augmentation
from .checkpoint import restore, save_checkpoint
from .config import Config
from .data import ImageData, batch_to_model, labelling_digest
from .distributed import World, agreed, barrier, device_for, on_main_then_shared
from .errors import UserError, expect
from .generation import SamplingSpec, sample, sample_batch
from .limits import check_memory
from .images import make_grid, png_bytes, scale_for_viewing, to_uint8
from .loss import diffusion_loss
from .metrics.memorization import REFERENCE_MIN, CopyFilter, is_copy, seen_views
from .outputs import refuse_shared
from .pretrained import load_pretrained
from .report import write_report
from .resolve import Prepared, prepare_training
from .run import Run, RunDir
from .runtime import (autocast, autocast_dtype, compile_network, environment, mix_seed,
                      resolve_device)
from .schedule import Schedule
from .streaming import batch_loader
from .unet import UNet, check_fits, count_parameters


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


class BalancedOrder:
    """Batch indices for step s drawn with replacement, image i with probability proportional to
    count(class of i) ** -power: each class is drawn in proportion to count ** (1 - power), so 0
    keeps the data's frequencies and 1 draws every class equally often. Seeded by (seed, step)."""

    def __init__(self, class_ids: torch.Tensor, power: float, batch_size: int, seed: int,
                 device: torch.device | str = "cpu"):
        counts = torch.bincount(class_ids).double()
        self.weights = counts[class_ids] ** -power
        self.batch, self.seed, self.device = batch_size, seed, device

    def indices(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, step, 4))
        drawn = torch.multinomial(self.weights, self.batch, replacement=True, generator=g)
        return drawn.to(self.device)


def batch_order(prep: Prepared, device: torch.device | str = "cpu") -> EpochOrder | BalancedOrder:
    """Which images make each step's batch: every image once an epoch, or by train.class_balance."""
    tc = prep.cfg.train
    if tc.class_balance:
        return BalancedOrder(prep.class_ids, tc.class_balance, tc.batch_size, tc.seed, device)
    return EpochOrder(len(prep.data), tc.batch_size, tc.seed, device)


@dataclass
class Job:
    """What a training run is, once resolved: read, never changed."""
    prep: Prepared
    run: RunDir
    world: World
    device: torch.device
    amp_dtype: torch.dtype | None
    micro_batch: int  # images per process per micro-batch
    evaluator: object | None
    copies: object | None  # train.audit_every: the training images and their copy threshold
    log: object = print

    @property
    def cfg(self) -> Config:
        return self.prep.cfg

    @property
    def rows(self) -> slice:
        """This process's rows of each global batch: rank r takes [r*A*m, (r+1)*A*m), for A
        micro-batches of m images."""
        per_rank = self.cfg.train.grad_accum * self.micro_batch
        return slice(self.world.rank * per_rank, (self.world.rank + 1) * per_rank)


@dataclass
class TrainState:
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    schedule: Schedule
    step: int = 0
    net: torch.nn.Module | None = None  # what the loop calls: the model, in DDP and/or compiled
    ddp: torch.nn.Module | None = None
    resumed_windows: dict | None = None  # the loss windows the checkpoint resumed from recorded


def train(cfg: Config, fresh: bool = False, log=print, progress: bool = True,
          world: World = World()) -> RunDir:
    """Train (or resume) the run in cfg.train.out_dir; returns its RunDir. Under torchrun pass the
    process's `World`: every process trains its share of each batch, rank 0 alone writes files."""
    expect(cfg, Config, "train() takes a Config (ddpmkit.load_config(path, overrides))")
    if not world.is_main:
        log, progress = (lambda *_: None), False
    device = resolve_device(device_for(world, cfg.train.device))
    tc = cfg.train
    micro_batch = tc.batch_size // (world.size * tc.grad_accum)
    if micro_batch * world.size * tc.grad_accum != tc.batch_size:
        raise UserError(f"train.batch_size={tc.batch_size} does not split into {world.size} "
                        f"process(es) x train.grad_accum={tc.grad_accum} equal micro-batches: make "
                        f"it a multiple of {world.size * tc.grad_accum}")
    amp_dtype = autocast_dtype(tc.precision, device)
    refuse_shared(Path(tc.out_dir), (Path(cfg.data.path),) if cfg.data.path else ())
    prep = prepare_training(cfg, fresh, log)
    # before anything is written: a refusal here leaves no half-made run behind
    check_fits(prep.cfg.model, prep.cfg.data.image_size, device,
               batch=0 if tc.activation_checkpointing else micro_batch)
    if device.type == "cpu":  # each step draws the global batch's noise and images whole
        pixels = prep.cfg.model.in_channels * prep.cfg.data.image_size**2
        check_memory(3 * 4 * tc.batch_size * pixels,
                     f"a step's noise and images of train.batch_size={tc.batch_size}",
                     "use a smaller train.batch_size (train.grad_accum splits activations only)")
    _check_monitors(prep)
    run = RunDir(tc.out_dir)
    if world.is_main and not fresh and run.is_run() and run.config_path.is_file():
        run.refuse_changed_config(prep.cfg)  # before the monitors' set-up, which takes minutes
    # built before the run is touched: a failure here leaves it as it was (--fresh included)
    evaluator = _evaluator(prep, device, log) if tc.eval_every and world.is_main else None
    copies = _copy_filter(prep, log) if tc.audit_every and world.is_main else None
    board = _tensorboard_writer() if tc.tensorboard and world.is_main else None
    job = Job(prep, run, world, device, amp_dtype, micro_batch, evaluator, copies, log)
    with atomic.FolderLock(run.path, "train") if world.is_main else contextlib.nullcontext():
        # rank 0 chooses a fresh start or a resume; the others learn the outcome (or its error)
        resume_from = on_main_then_shared(world, lambda: run.prepare(job.cfg, fresh, log))
        state = _build_state(job)
        if not _start(job, state, resume_from):
            return job.run
        stopped = _fit(job, state, progress, board and board(job.run))
    if stopped:  # saved; now leave non-zero, so a scheduler does not take the run as finished
        log(f"stopped at step {state.step} on {stopped}; checkpoint saved; "
            f"rerun the same command to resume")
        raise KeyboardInterrupt
    if prep.data.skipped:
        log(f"{len(prep.data.skipped)} unreadable image(s) were skipped; "
            f"they are listed in {job.run.meta_path}")
    if world.is_main:
        report = write_report(job.run.path, warn=lambda m: log(f"warning: {m}"))
        log(f"trained {job.run.path} to step {state.step}: checkpoints in {job.run.checkpoints}, "
            f"grids in {job.run.grids}, log {job.run.stats_path}, report {report}")
    return job.run


def _fit(job: Job, state: TrainState, progress: bool, board) -> str | None:
    """The loop, from state.step to train.max_steps; returns the signal that stopped it, if one
    did."""
    tc = job.cfg.train
    next_batch = _batches(job, state)
    meter = Meter(job.device, state.step, _progress_bar(progress, state.step, tc.max_steps), board)
    meter.resume(state.resumed_windows or {})
    stopping = False
    with StopSignal() as signal_:
        while state.step < tc.max_steps:
            # Draw the step's images, timesteps, noise, flips and labels: seeded by (seed, step).
            batch = _draw(job, state.schedule, state.step, next_batch)
            # Accumulate gradients over the micro-batches.
            loss = _accumulate_gradients(job, state, batch)
            # Update the weights; a non-finite step is skipped on the device, without a host sync.
            finite = _optimizer_step(job, state, loss)
            # Update the EMA.
            _update_ema(state, tc.ema_decay, finite)
            meter.add(loss, finite)
            state.step += 1
            # Log at intervals: the loop's only host syncs.
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                meter.log(job, state)
            # Decide whether to stop: all processes together, under torchrun.
            done, stopping = _stopping(job, state, meter, signal_)
            # Checkpoint first: a signal's grace period (often 30 s) is for it, not for samples.
            # evaluations and audits score a saved checkpoint: their steps are saved too
            saved = done or any(every and state.step % every == 0
                                for every in (tc.checkpoint_every, tc.eval_every, tc.audit_every))
            if saved:
                _checkpoint(job, state, meter)
            # Sample the grid and evaluate, unless a signal is waiting.
            if (state.step % tc.sample_every == 0 or done) and not stopping:
                _grid(job, state, board)
            if (saved and tc.eval_every and (state.step % tc.eval_every == 0 or done)
                    and not stopping):
                _evaluate(job, state, board)
            if (saved and tc.audit_every and (state.step % tc.audit_every == 0 or done)
                    and not stopping):
                _audit(job, state)
            if done:
                break
    meter.close()
    return (signal_.requested or "a signal") if stopping else None


# --- set-up --------------------------------------------------------------------------------------

def _build_state(job: Job) -> TrainState:
    tc, device = job.cfg.train, job.device
    torch.manual_seed(tc.seed)
    model = UNet(job.cfg.model, job.cfg.data.image_size).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda" and tc.channels_last:
        model, ema = (model.to(memory_format=torch.channels_last),
                      ema.to(memory_format=torch.channels_last))
    # Fused AdamW (CPU and CUDA) takes a found_inf flag: a non-finite step is skipped on the device,
    # so the step never waits for the host to read the loss.
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cuda") if job.amp_dtype == torch.float16 else None
    return TrainState(model, ema, opt, scaler, Schedule.from_config(job.cfg.diffusion))


def _start(job: Job, state: TrainState, resume_from) -> bool:
    """Restore a checkpoint, or start (from pretrained weights, if any) and record the run; then
    wrap the network for the loop. False when there is nothing left to train."""
    run, data, log = job.run, job.prep.data, job.log
    if resume_from is not None:
        meta = restore(resume_from, state.model, state.ema, state.opt)
        state.step, state.resumed_windows = meta["step"], meta["extra"].get("meter")
        log(f"resuming {run.path} from step {state.step} ({resume_from.name})")
    pretrained = None
    if resume_from is None and job.prep.source:
        pretrained = load_pretrained(state.model, state.ema, job.prep.source,
                                     job.cfg.train.augment, log)
        log(f"starting from {pretrained}; optimizer and step start from zero")
    tc = job.cfg.train
    if state.step >= tc.max_steps:  # nothing to train: the run's record stays as it is
        log(f"{run.path} is already trained to step {state.step} (train.max_steps={tc.max_steps})"
            + ("; nothing was recorded, the changes noted above included" if run.changes else ""))
        return False
    if job.world.is_main:
        processes = run.meta().get("processes", 1)
        if resume_from is not None and processes != job.world.size:  # the shards sum otherwise
            run.add_change("processes", processes, job.world.size, log)
        # a streamed dataset is not read whole just for its digests
        digests = data.digests if isinstance(data, ImageData) else None
        counts = _class_counts(data, job.cfg)
        meta = {"environment": environment(job.device), "data": data.source,
                "num_images": len(data), "skipped_images": [f for f, _ in data.skipped],
                "parameters": count_parameters(state.model), "processes": job.world.size,
                "init_from": pretrained, "class_counts": counts,
                "labels_sha256": labelling_digest(digests, data.labels)
                if counts is not None and digests is not None else None}
        if resume_from is not None and digests is not None:
            run.warn_relabelled(meta, digests, log)
        run.start(job.cfg, meta, state.step)
        run.truncate_stats(state.step, log)
        if digests is not None:
            run.record_training_images(digests, log)
    size = job.cfg.data.image_size
    log(f"training {run.path}: {count_parameters(state.model):,} parameters at {size}x{size}, "
        f"{data.source}, on {job.device}"
        + (f" x {job.world.size} processes" if job.world.size > 1 else "")
        + (f", {tc.grad_accum} micro-batches of {job.micro_batch} per step"
           if tc.grad_accum > 1 else ""))
    state.model.train()
    state.model.activation_checkpointing = tc.activation_checkpointing
    state.net = state.model
    if job.world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        state.net = state.ddp = DistributedDataParallel(
            state.model, device_ids=[job.device.index] if job.device.type == "cuda" else None)
    if job.cfg.model.compile:
        state.net = compile_network(state.net, job.cfg.model.compile_mode)
    return True


def _class_counts(data, cfg: Config) -> dict[str, int] | None:
    """A class-conditional run's training images per class."""
    if not cfg.model.class_conditional or not data.labels:
        return None
    counts = Counter(data.labels)
    return {name: counts[name] for name in cfg.data.class_names}


def _batches(job: Job, state: TrainState):
    """step -> (this process's uint8 images of the step's batch, the class of every image of the
    global batch, or None for an unconditional model)."""
    data, tc, device = job.prep.data, job.cfg.train, job.device
    class_ids = None if job.prep.class_ids is None else job.prep.class_ids.to(device)
    order = batch_order(job.prep, device)
    if job.cfg.data.stream:  # workers read the images; the order is drawn again there, on the CPU
        loader = iter(batch_loader(data, batch_order(job.prep), job.rows,
                                   state.step, tc.max_steps, workers=job.cfg.data.workers,
                                   pin=device.type == "cuda"))
        images = lambda step: next(loader).to(device, non_blocking=True)  # noqa: E731
    else:
        on_device = data.images.to(device)
        images = lambda step: on_device[order.indices(step)[job.rows]]  # noqa: E731
    return lambda step: (images(step),
                         None if class_ids is None else class_ids[order.indices(step)])


# --- one step ------------------------------------------------------------------------------------

@dataclass
class Batch:
    images: torch.Tensor  # this process's uint8 images
    t: torch.Tensor  # timesteps, noise and flips of the whole global batch
    noise: torch.Tensor
    flips: torch.Tensor | None
    labels: torch.Tensor | None  # this process's; -1 where dropped
    augment: augmentation.Augmentation | None  # of the whole global batch


def _draw(job: Job, schedule: Schedule, step: int, next_batch) -> Batch:
    tc, device, n = job.cfg.train, job.device, job.cfg.train.batch_size
    g = torch.Generator(device).manual_seed(mix_seed(tc.seed, step, 2))
    torch.manual_seed(mix_seed(tc.seed, step, 3, job.world.rank))  # dropout
    flips = torch.rand(n, device=device, generator=g) < 0.5 if job.cfg.data.hflip else None
    t = torch.randint(0, schedule.num_timesteps, (n,), device=device, generator=g)
    shape = (job.cfg.model.in_channels, job.cfg.data.image_size, job.cfg.data.image_size)
    noise = torch.randn((n, *shape), device=device, generator=g)
    images, class_ids = next_batch(step)
    labels = None
    if class_ids is not None:  # dropped labels (-1) train the unconditional model guidance needs
        dropped = torch.rand(n, device=device, generator=g) < tc.label_dropout
        labels = torch.where(dropped, -1, class_ids)[job.rows]
    augment = None
    if tc.augment:  # drawn last, so a step's other draws do not depend on train.augment
        augment = augmentation.draw(tuple(tc.augment), tc.augment_p, n, shape[-1], g, device)
    return Batch(images, t, noise, flips, labels, augment)


def _accumulate_gradients(job: Job, state: TrainState, batch: Batch) -> torch.Tensor:
    tc, m = job.cfg.train, job.micro_batch
    for group in state.opt.param_groups:
        group["lr"] = tc.lr * min(1.0, (state.step + 1) / max(1, tc.warmup_steps))
    loss = torch.zeros((), device=job.device)
    state.opt.zero_grad(set_to_none=True)
    for k in range(tc.grad_accum):
        mine = slice(k * m, (k + 1) * m)  # of this process's rows
        rows = slice(job.rows.start + k * m, job.rows.start + (k + 1) * m)  # global batch
        x0 = batch_to_model(batch.images[mine], None if batch.flips is None else batch.flips[rows])
        augment = None
        if batch.augment is not None:
            x0 = augmentation.apply(x0, batch.augment[rows])
            augment = batch.augment[rows].labels(x0.shape[-1])
        if job.device.type == "cuda" and tc.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        # DDP all-reduces gradients on the last micro-batch only
        last = state.ddp is None or k == tc.grad_accum - 1
        with contextlib.nullcontext() if last else state.ddp.no_sync():
            with autocast(job.device, job.amp_dtype):
                labels = None if batch.labels is None else batch.labels[mine]
                micro = diffusion_loss(
                    state.net, state.schedule, job.cfg.diffusion.prediction, x0, batch.t[rows],
                    batch.noise[rows], labels=labels, augment=augment) / tc.grad_accum
            (state.scaler.scale(micro) if state.scaler else micro).backward()
        loss = loss + micro.detach()
    return loss


def _optimizer_step(job: Job, state: TrainState, loss: torch.Tensor) -> torch.Tensor:
    """Clip, then step; returns 1.0 (or 0.0 for a skipped non-finite step) as a device tensor."""
    if state.scaler:
        state.scaler.unscale_(state.opt)
    clip = job.cfg.train.grad_clip if job.cfg.train.grad_clip > 0 else float("inf")
    gnorm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    finite = (torch.isfinite(loss) & torch.isfinite(gnorm)).float()
    if job.world.size > 1:  # a NaN on any process skips the step on all of them
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if state.scaler:
        state.scaler.step(state.opt)  # skips steps with inf gradients itself
        state.scaler.update()
    else:
        state.opt.found_inf = 1.0 - finite
        state.opt.step()
    return finite


@torch.no_grad()
def _update_ema(state: TrainState, ema_decay: float, finite: torch.Tensor) -> None:
    """ema += w * (params - ema), w a device tensor (0 on a skipped step). Every process holds the
    same weights after the all-reduce, so each updates its own EMA identically."""
    decay = min(ema_decay, (1 + state.step) / (10 + state.step))  # EMA warmup
    ema_params, params = list(state.ema.parameters()), list(state.model.parameters())
    # foreach_lerp_ would take w as a Python scalar, reading it back from the GPU every step
    delta = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(delta, (1.0 - decay) * finite)
    torch._foreach_add_(ema_params, delta)


# --- bookkeeping ---------------------------------------------------------------------------------

_COUNTERS = ("loss_sum", "skipped_sum", "nonfinite_run", "worst_run")  # Meter's, on the device
_WINDOWS = (*_COUNTERS, "step_at_log", "ckpt_loss_sum", "ckpt_loss_n", "skipped_total")


class Meter:
    """Loss and non-finite-step counters, kept on the device and read at log intervals only."""

    def __init__(self, device: torch.device, step: int, bar, board):
        zero = lambda: torch.zeros((), device=device)  # noqa: E731
        self.loss_sum, self.skipped_sum, self.nonfinite_run, self.worst_run = (
            zero(), zero(), zero(), zero())
        self.bar, self.board, self.device = bar, board, device
        self.ckpt_loss_sum, self.ckpt_loss_n, self.skipped_total = 0.0, 0, 0
        self.t_start = self.t_log = time.time()
        self.step_at_log = self.step_at_clock = step  # the log window's start; the timed one's

    @torch.no_grad()
    def add(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.loss_sum += loss.nan_to_num(0.0, 0.0, 0.0) * finite
        self.skipped_sum += 1.0 - finite
        self.nonfinite_run.mul_(1.0 - finite).add_(1.0 - finite)
        torch.maximum(self.worst_run, self.nonfinite_run, out=self.worst_run)

    def log(self, job: Job, state: TrainState) -> None:
        """Read the counters (a host sync), stop a diverged run, append a line to stats.jsonl."""
        tc, n = job.cfg.train, state.step - self.step_at_log
        counters = torch.stack([self.loss_sum, self.skipped_sum, self.worst_run])
        if job.world.size > 1:
            torch.distributed.all_reduce(counters)
            counters /= job.world.size
        total_loss, skipped, worst = counters.tolist()
        skipped, worst = round(skipped), round(worst)
        self.loss_sum.zero_(), self.skipped_sum.zero_(), self.worst_run.copy_(self.nonfinite_run)
        self.skipped_total += skipped
        if worst >= tc.max_nonfinite:
            self.bar.close()
            raise UserError(f"training diverged: {worst} non-finite losses in a row by step "
                            f"{state.step}; {_kept(job.run)}; lower train.lr")
        mean_loss = total_loss / (n - skipped) if n > skipped else float("nan")
        if math.isfinite(mean_loss):
            self.ckpt_loss_sum, self.ckpt_loss_n = (self.ckpt_loss_sum + mean_loss * n,
                                                    self.ckpt_loss_n + n)
        now = time.time()
        timed = state.step - self.step_at_clock  # a resumed window began before this process
        ips = timed * tc.batch_size / max(now - self.t_log, 1e-9)
        record = {"step": state.step, "images_seen": state.step * tc.batch_size, "loss": mean_loss,
                  "lr": state.opt.param_groups[0]["lr"], "images_per_sec": ips,
                  "sec_per_kimg": 1000 / ips, "memory_mb": _memory_mb(self.device),
                  "elapsed_sec": now - self.t_start, "skipped_nonfinite": self.skipped_total}
        if job.world.is_main:
            job.run.append_stats(record)
        if self.board:
            for key in ("loss", "lr", "images_per_sec", "memory_mb"):
                self.board.add_scalar(f"train/{key}", record[key], state.step)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
        self.t_log, self.step_at_log, self.step_at_clock = now, state.step, state.step
        self.bar.update(timed)

    def windows(self, world: World) -> dict:
        """The counts since the last log line and checkpoint, as a checkpoint records them: a run
        resumed from it logs and records the losses an uninterrupted run would."""
        counters = torch.stack([getattr(self, name) for name in _COUNTERS])
        if world.size > 1:  # each process restores the mean, which the next log sums back
            torch.distributed.all_reduce(counters)
            counters /= world.size
        return {**dict(zip(_COUNTERS, counters.tolist())), "step_at_log": self.step_at_log,
                "ckpt_loss_sum": self.ckpt_loss_sum, "ckpt_loss_n": self.ckpt_loss_n,
                "skipped_total": self.skipped_total}

    def resume(self, windows: dict) -> None:
        """Go on with the windows a checkpoint recorded (none, or not numbers: start them anew)."""
        if not all(isinstance(windows.get(k), (int, float)) for k in _WINDOWS):
            return
        for name in _COUNTERS:
            getattr(self, name).fill_(windows[name])
        self.step_at_log, self.ckpt_loss_sum, self.ckpt_loss_n, self.skipped_total = (
            int(windows["step_at_log"]), windows["ckpt_loss_sum"], int(windows["ckpt_loss_n"]),
            int(windows["skipped_total"]))

    def checkpoint_loss(self, start_over: bool) -> float:
        """The mean loss since the last train.checkpoint_every checkpoint (NaN if none was
        logged); at such a checkpoint, the window starts over. A checkpoint between them (a stop,
        an evaluation) leaves it running: where a run stopped never changes a checkpoint's loss."""
        mean = self.ckpt_loss_sum / self.ckpt_loss_n if self.ckpt_loss_n else float("nan")
        if start_over:
            self.ckpt_loss_sum, self.ckpt_loss_n = 0.0, 0
        return mean

    def close(self) -> None:
        self.bar.close()
        if self.board:
            self.board.close()


def _stopping(job: Job, state: TrainState, meter: Meter, signal_: StopSignal) -> tuple[bool, bool]:
    """(done, stopped by a signal). One process alone must never stop: under torchrun they agree at
    log intervals."""
    tc = job.cfg.train
    out_of_time = tc.max_minutes > 0 and time.time() - meter.t_start > tc.max_minutes * 60
    out_of_time, stopping = agreed(job.world, [out_of_time, bool(signal_.requested)],
                                   at=state.step % tc.log_every == 0)
    if out_of_time:
        job.log(f"stopped at step {state.step}: train.max_minutes={tc.max_minutes} reached")
    return state.step == tc.max_steps or out_of_time or stopping, stopping


def _checkpoint(job: Job, state: TrainState, meter: Meter) -> None:
    """Save model, EMA, optimizer and the loss windows (rank 0) and record it; non-finite weights
    are never saved."""
    mean_loss = meter.checkpoint_loss(state.step % job.cfg.train.checkpoint_every == 0)
    windows = meter.windows(job.world)
    if job.world.is_main:
        weights = [*state.model.named_parameters(), *state.ema.named_parameters()]
        bad = [name for name, p in weights if not torch.isfinite(p).all()]
        if bad:
            raise UserError(f"training diverged: the weights became non-finite by step "
                            f"{state.step} ({bad[0]}); {_kept(job.run)}; lower train.lr")
        path = job.run.checkpoint_file(state.step)
        try:
            sha = save_checkpoint(path, state.model, state.ema, state.opt, state.step,
                                  extra={"meter": windows})
        except OSError as exc:  # disk full, quota, permissions: the temp file is already removed
            steps = [e["step"] for e in job.run.read_state()["checkpoints"]]
            kept = f"checkpoint of step {max(steps)} kept" if steps else "no earlier checkpoint"
            raise UserError(f"cannot write checkpoint {path}: {exc.strerror or exc}; {kept}, "
                            f"nothing half-written") from None
        job.run.add_checkpoint(sha, state.step, mean_loss, job.cfg.train.keep_last)
    barrier()


def _view(job: Job, state: TrainState) -> Run:
    """The EMA network as a loaded run, for sampling the grid and evaluating."""
    return Run(job.run.path, job.cfg, state.ema, state.schedule, state.step, "")


def _grid(job: Job, state: TrainState, board) -> None:
    """Sample the fixed-noise grid (images 0..n-1 of train.seed) with the EMA weights."""
    if job.world.is_main:
        tc = job.cfg.train
        spec = SamplingSpec("ddim", steps=min(tc.grid_steps, state.schedule.num_timesteps))
        grid = scale_for_viewing(make_grid(to_uint8(
            sample_batch(_view(job, state), range(tc.grid_images), tc.seed, spec))))
        atomic.write_bytes(job.run.grids / f"step_{state.step:09d}.png", png_bytes(grid),
                           fsync=False)
        if board:
            board.add_image("samples", grid.numpy(), state.step)
    barrier()


def _fixed_samples(job: Job, state: TrainState, num: int) -> torch.Tensor:
    """`num` images of the EMA weights from train.seed's noise (DPM-Solver++ at its default steps),
    the same noise at every evaluation and audit, so their numbers compare along the run."""
    return sample(_view(job, state), num=num, seed=job.cfg.train.seed, sampler="dpmpp-2m")


def _evaluate(job: Job, state: TrainState, board) -> None:
    """Sample train.eval_num images with the EMA weights (fixed seed) and score them."""
    if job.world.is_main:
        tc = job.cfg.train
        metrics = job.evaluator(_fixed_samples(job, state, tc.eval_num))
        job.run.record_evaluation(state.step, metrics, tc.keep_last)
        if board:
            board.add_scalar(f"eval/fd_{metrics['features']}", metrics["fd"], state.step)
    barrier()


def _audit(job: Job, state: TrainState) -> None:
    """Sample train.audit_num images with the EMA weights (fixed seed) and log how many are
    near-copies of training images (metrics/memorization.py)."""
    if job.world.is_main:
        copies = job.copies
        d1 = copies.distances(_fixed_samples(job, state, job.cfg.train.audit_num))
        flagged = is_copy(d1, copies.calibration.threshold)
        job.run.append_stats({"step": state.step, "audit": {
            "generated": len(d1), "copy_rate": float(flagged.mean()),
            "median_distance": float(np.median(d1)), "threshold": copies.calibration.threshold}})
    barrier()


class StopSignal:
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


def _progress_bar(enabled: bool, step: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=step, desc="training", unit="step", dynamic_ncols=True,
                disable=not enabled)


def _tensorboard_writer():
    """RUN -> a TensorBoard writer for RUN/tensorboard; checked before anything is written."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard=true needs the tensorboard package: "
                        "pip install tensorboard") from None
    return lambda run: SummaryWriter(str(run.path / "tensorboard"))


def _check_monitors(prep: Prepared) -> None:
    """train.audit_every and train.eval_every's refusals, before anything is written."""
    tc, data = prep.cfg.train, prep.data
    if tc.audit_every and not isinstance(data, ImageData):
        raise UserError("train.audit_every compares samples with every training image, which a "
                        "streamed dataset does not hold: set train.audit_every=0 and audit "
                        "samples afterwards (ddpmkit audit)")
    if tc.audit_every and len(data) < REFERENCE_MIN:
        raise UserError(f"train.audit_every calibrates its copy threshold on the training images' "
                        f"leave-one-out distances, and {len(data)} are fewer than "
                        f"{REFERENCE_MIN}: set train.audit_every=0 and audit samples afterwards "
                        f"against held-out images (ddpmkit audit --holdout)")
    if tc.eval_every and tc.eval_features == "classifier" and not data.labels:
        raise UserError(f"train.eval_every needs labelled training images for "
                        f"train.eval_features=classifier, and {prep.cfg.data.path or 'the data'} "
                        f"has no labels: set train.eval_features=efficientnet or inception")


def _copy_filter(prep: Prepared, log) -> CopyFilter:
    copies = CopyFilter.calibrated(prep.data.images, views=seen_views(prep.cfg))
    log(f"train.audit_every: near-copy threshold {copies.calibration.threshold:.4f} (leave-one-out "
        f"distances of the training images)")
    copies.calibration.warn("train.audit_every", log, "audit the samples of a checkpoint against "
                            "held-out images (ddpmkit audit --holdout)")
    return copies


def _evaluator(prep: Prepared, device: torch.device, log):
    from .metrics.evaluate import TrainingEvaluator

    data, cfg = prep.data, prep.cfg
    if isinstance(data, ImageData):
        return TrainingEvaluator(cfg.train.eval_features, data.images, data.labels, device, log)
    n = min(len(data), 10_000)  # streamed: the reference is the first (up to) 10k images, read once
    labels = data.labels[:n] if data.labels else None
    return TrainingEvaluator(cfg.train.eval_features, data.read(np.arange(n)), labels, device, log)


def _kept(run: RunDir) -> str:
    """What a diverged run leaves to go back to."""
    return (f"last good checkpoint kept in {run.checkpoints}" if run.read_state()["checkpoints"]
            else "no checkpoint was written before it")
