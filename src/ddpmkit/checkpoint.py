"""Checkpoints: one safetensors file per saved step, holding the network, its EMA and the optimizer.

No pickles anywhere: tensors go into safetensors, everything else into its JSON metadata. Each
file is written atomically and its SHA-256 recorded in the run's state.json, so a damaged file is
detected on resume and the previous good one used instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import atomic
from .errors import UserError

FORMAT = "ddpmkit-checkpoint/1"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim/{idx}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model: nn.Module, ema: nn.Module,
                    optimizer: torch.optim.Optimizer | None,
                    step: int, extra: dict | None = None) -> str:
    """Write atomically (fsynced); returns the file's SHA-256."""
    tensors = {f"model/{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({f"ema/{k}": v.detach().contiguous().cpu() for k, v in ema.state_dict().items()})
    optim_meta = None
    if optimizer is not None:
        opt_tensors, optim_meta = _flatten_optimizer(optimizer)
        tensors.update(opt_tensors)
    metadata = {"format": FORMAT, "step": str(step), "optimizer": json.dumps(optim_meta),
                "extra": json.dumps(extra or {})}
    with atomic.atomic_path(path, fsync=True) as tmp:
        save_tensors(tensors, tmp, metadata)
    return file_sha256(path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    """safetensors' save_file, whose I/O failures (a full disk included) are OSErrors here, as
    Python's own writes' are (`atomic_path` names the file)."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if not code:  # not a failed write: a bug, with its traceback
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1]))) from None


def read_checkpoint(path: Path,
                    prefixes: tuple[str, ...] = ("model", "ema", "optim")) -> tuple[dict, dict]:
    """-> ({prefix: {name: tensor}}, metadata). Raises UserError if the file is not a ddpmkit
    checkpoint."""
    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise UserError(f"{path} is not a ddpmkit checkpoint "
                                f"(format {meta.get('format')!r})")
            for name in f.keys():
                prefix, _, rest = name.partition("/")
                if prefix in groups:
                    groups[prefix][rest] = f.get_tensor(name)
            meta = {"step": int(meta["step"]),
                    "optimizer": json.loads(meta.get("optimizer", "null")),
                    "extra": json.loads(meta.get("extra", "{}"))}
            if meta["step"] < 0 or not isinstance(meta["extra"], dict) or not isinstance(
                    meta["optimizer"], (dict, type(None))):
                raise ValueError("its metadata is not what ddpmkit writes")
    except UserError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise UserError(f"cannot read checkpoint {path}: {exc}") from None
    return groups, meta


def load_into(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Strict load with a one-line error naming the mismatch (a checkpoint of another
    architecture)."""
    check_weights(module, weights, what)
    module.load_state_dict(weights)


def check_weights(module: nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights that do not fit the module tensor for tensor (it may live on the meta
    device)."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise UserError(f"{what} does not fit this model's architecture ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors; "
                        f"first: {first})")


def restore(path: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    groups, meta = read_checkpoint(path)
    if meta.get("optimizer") is None:  # an imported model: weights, no training state
        run = path.parent.parent
        raise UserError(f"{path} holds imported weights without optimizer state, "
                        f"so there is no training to resume: "
                        f"fine-tune from it with --init-from {run} and a new --out")
    load_into(model, groups["model"], f"checkpoint {path}")
    load_into(ema, groups["ema"], f"checkpoint {path}")
    try:
        optimizer.load_state_dict(_unflatten_optimizer(groups["optim"], meta["optimizer"]))
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot resume from {path}: its optimizer state is not what ddpmkit "
                        f"writes ({type(exc).__name__}: {str(exc)[:80]})") from None
    return meta


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
