"""`ddpmkit import` and `ddpmkit export`: a diffusers model as a run, a run as a diffusers pipeline.

The conversion itself, exact or refused, is diffusers_format.py's; this writes the folders, each
built under a hidden name and renamed into place (outputs.staged).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from . import atomic
from .checkpoint import save_checkpoint, save_tensors
from .config import updated
from .diffusers_format import (CLASS_NAMES_FILE, DIFFUSERS_VERSION, WEIGHTS,
                               ddpmkit_to_diffusers_config, ddpmkit_to_diffusers_state_dict,
                               read_diffusers, write_json)
from .outputs import staged
from .run import RunDir, load_run
from .runtime import environment
from .unet import count_parameters


def import_diffusers(source: str | Path, out: str | Path, log=print) -> Path:
    """A diffusers pipeline folder, UNet2DModel folder or hub id -> a ddpmkit run folder `out`
    (config.yaml, a step-0 checkpoint with model = EMA = the imported weights, state.json,
    meta.json). Refuses a non-empty `out`. Returns `out`."""
    out = Path(out)
    with staged(out) as tmp:  # checks `out` before anything is read
        cfg, net, provenance = read_diffusers(source, log)
        origin = provenance["imported_from"]
        cfg = updated(cfg, {"train.out_dir": str(out)})
        run = RunDir(tmp)
        meta = {**provenance, "data": f"imported from diffusers ({origin})",
                "parameters": count_parameters(net),
                "environment": environment(torch.device("cpu"))}
        run.start(cfg, meta, step=0)
        # model and EMA are the same weights, but safetensors refuses a tensor stored twice: a copy
        sha = save_checkpoint(run.checkpoint_file(0), net, copy.deepcopy(net), None, 0,
                              extra={"imported_from": origin})
        run.add_checkpoint(sha, 0, math.nan, keep_last=1)  # no training loss exists
    log(f"imported {origin} into {out}: {count_parameters(net):,} parameters, "
        f"{cfg.data.image_size}x{cfg.data.image_size}, {cfg.model.in_channels} channel(s)")
    if not provenance["label_dropout_known"]:
        log(f"note: {origin} does not say whether the model was trained with labels dropped, so "
            f"sampling refuses guidance other than 1; if it was, set train.label_dropout in "
            f"{out / 'config.yaml'}")
    return out


def export_diffusers(run_path: str | Path, out: str | Path, checkpoint: str = "latest",
                     ema: bool = True, log=print) -> Path:
    """A ddpmkit run's checkpoint -> a DDPMPipeline folder `out` (model_index.json, unet/,
    scheduler/) that DDPMPipeline.from_pretrained and UNet2DModel.from_pretrained(out/"unet") load.
    Refuses a non-empty `out`. Returns `out`."""
    out = Path(out)
    with staged(out) as tmp:
        run = load_run(run_path, checkpoint, ema)
        unet_config, scheduler_config = ddpmkit_to_diffusers_config(run.config)
        weights = ddpmkit_to_diffusers_state_dict(run.net.state_dict(), run.config)
        index = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
        write_json(tmp / "model_index.json", index)
        write_json(tmp / "unet" / "config.json", unet_config)
        with atomic.atomic_path(tmp / "unet" / f"{WEIGHTS}.safetensors") as path:
            save_tensors({k: v.detach().contiguous().cpu() for k, v in weights.items()}, path,
                         {"format": "pt"})
        write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config)
        if run.config.data.class_names:  # and whether guidance other than 1 has a model to use
            write_json(tmp / CLASS_NAMES_FILE, {"class_names": run.config.data.class_names,
                                                "label_dropout": run.config.train.label_dropout})
    log(f"exported {run.path} ({run.checkpoint}, {'EMA' if ema else 'raw'} weights) to {out}")
    if run.config.model.num_classes:
        log(f"note: the model is class-conditional ({run.config.model.num_classes} classes); "
            f"DDPMPipeline cannot pass class labels: "
            f"call UNet2DModel.from_pretrained('{out / 'unet'}') with class_labels=... "
            f"in your own scheduler loop")
    return out
