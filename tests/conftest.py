"""Shared fixtures: a tiny model config so every test trains in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import os

import numpy as np
import pytest
import torch
from hypothesis import settings
from PIL import Image

from ddpmkit.config import load_config

# A UNet of ~60k parameters, 100 diffusion steps, logging and checkpoints every few steps.
TINY = {
    "model.base_channels": 16, "model.norm_groups": 8, "model.channel_mult": [1, 2],
    "model.num_res_blocks": 1, "diffusion.num_timesteps": 100, "train.batch_size": 32,
    "train.lr": 2e-3, "train.warmup_steps": 5, "train.log_every": 5, "train.sample_every": 1000,
    "train.checkpoint_every": 10, "train.grid_images": 4, "train.grid_steps": 5, "sample.steps": 10,
}

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Property tests: the same examples on every CI run; HYPOTHESIS_PROFILE=wide searches far more,
# at random.
settings.register_profile("ci", max_examples=80, derandomize=True, deadline=None)
settings.register_profile("wide", max_examples=3000, derandomize=False, deadline=None,
                          database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def tiny_config(tmp_path: Path, **overrides):
    return load_config(None, {**TINY, "train.out_dir": str(tmp_path / "run"), **overrides})


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """The classifier and feature caches of the whole session in a folder of its own, never the
    user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDPMKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def write_images(folder: Path, n: int = 12, size=(10, 12), mode: str = "L",
                 seed: int = 0) -> list[Path]:
    """n random images of `mode` into folder; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        p = folder / f"img_{i:03d}.png"
        img.save(p)
        paths.append(p)
    return paths
