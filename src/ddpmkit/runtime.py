"""Device choice, precision and the facts about this environment a run records."""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import subprocess
import sys

import numpy as np
import torch

from .errors import UserError


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from several integers: (0, 1) and (1, 0) share nothing."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):  # e.g. meta holds no values to compute with
        raise UserError(f"device {name!r} cannot run ddpmkit: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but this PyTorch sees no CUDA GPU: "
                        f"use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name} asked for, but this PyTorch or machine has no Apple GPU "
                        f"(MPS): use --device cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32. 'auto' is bf16 on CUDA (no loss scaling needed), fp32 on CPU."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise UserError(f"precision {precision} needs a CUDA device; on {device.type} use fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class _FreshOutputs(torch.nn.Module):
    """A compiled network for sampling under CUDA graphs, which write each call's output into the
    same memory: samplers keep earlier outputs (DPM-Solver++'s previous x0), so each call starts a
    new graph step and hands out a copy (one image batch copied per network call)."""

    def __init__(self, compiled: torch.nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args):
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args).clone()


def compile_network(net: torch.nn.Module, mode: str = "default",
                    for_sampling: bool = False) -> torch.nn.Module:
    """torch.compile with one of its modes; "reduce-overhead" and "max-autotune" also capture CUDA
    graphs on GPUs (on CPU they compile as "default" does)."""
    compiled = torch.compile(net, mode=None if mode == "default" else mode)
    if for_sampling and mode in ("reduce-overhead", "max-autotune"):
        return _FreshOutputs(compiled)
    return compiled


def version() -> str:
    """ddpmkit's version, from the installed package's metadata (pyproject.toml is its one
    source)."""
    try:
        return importlib.metadata.version("ddpmkit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree never installed
        return "0+unknown"


def environment(device: torch.device) -> dict:
    info = {"ddpmkit": version(), "torch": torch.__version__, "python": sys.version.split()[0],
            "platform": platform.platform(), "device": str(device), "command": sys.argv}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=__file__.rsplit("/", 1)[0]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info
