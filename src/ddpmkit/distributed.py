"""torchrun support: which process am I, and waiting for the others. A plain single process is
rank 0 of 1 and every call here is a no-op for it."""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_name: str = "auto", timeout_minutes: float = 60.0) -> World:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPU).
    Rendezvous (--nnodes, --rdzv-endpoint ...) is torchrun's: it arrives here as MASTER_ADDR/PORT,
    RANK and WORLD_SIZE. `timeout_minutes` bounds every wait on another process, stated rather
    than left to the backend's default."""
    size = world_size()
    if size <= 1:
        return World()
    local_rank = _env_int("LOCAL_RANK", "0")
    rank = _env_int("RANK", "0")  # read by init_process_group, which would raise a bare ValueError
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UserError(f"WORLD_SIZE={size} is set but {name} is not: start the job with "
                            f"torchrun (which sets both), or unset WORLD_SIZE")
    _env_int("MASTER_PORT", "")
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        # variables left from another job would wait here, silent, for processes that never come
        print(f"ddpmkit: process {rank} of {size} joining at {where} (waits up to "
              f"{timeout_minutes:g} minutes for the others)", file=sys.stderr)
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                    timeout=datetime.timedelta(minutes=timeout_minutes))
        except dist.DistError as exc:
            raise UserError(f"the {size} processes did not all join at {where} ({exc}): check "
                            f"that each was started (torchrun starts them), or unset WORLD_SIZE "
                            f"to run as one process") from None
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def world_size() -> int:
    """The processes torchrun started (WORLD_SIZE; 1 without torchrun)."""
    return _env_int("WORLD_SIZE", "1")


def _env_int(name: str, default: str) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise UserError(f"environment variable {name}={text!r} is no number: torchrun sets it; "
                        f"unset it to run as one process") from None


def device_for(world: World, device_name: str) -> str:
    """Under torchrun each process takes its own GPU."""
    if world.size > 1 and device_name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{world.local_rank}"
    return device_name


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


T = TypeVar("T")


def on_main_then_shared(world: World, fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and hand its result (or its UserError) to every process, so a refusal
    on rank 0 stops all of them with the same message instead of leaving them waiting."""
    from .errors import UserError

    if world.size == 1:
        return fn()
    box: list = [None]
    if world.is_main:
        try:
            box[0] = ("ok", fn())
        except UserError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)  # our own objects between our processes, not user files
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def agreed(world: World, flags: list[bool], at: bool) -> list[bool]:
    """Each flag true on any process. Alone, at once; under torchrun only where `at` holds (a
    collective, so all processes call it at the same steps) and false in between."""
    if world.size == 1:
        return [bool(f) for f in flags]
    if not at:
        return [False] * len(flags)
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else "cpu")
    votes = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]
