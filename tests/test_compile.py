"""torch.compile on CPU (model.compile, sample.compile): the same numbers as eager, and plain
checkpoints."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from ddpmkit.cli import main
from ddpmkit.training import train

pytestmark = [pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                                 reason="torch.compile on CPU generates C++ and needs a compiler"),
              # torch's own, while compiling
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]


def _images(folder) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p), dtype=np.int16)
                     for p in sorted(folder.glob("individual/*.png"))])


def test_compiled_training_and_sampling_match_eager(tiny, tmp_path):
    # dropout off: compiled code draws its random masks with its own generator
    runs = {mode: train(tiny(**{"train.max_steps": 4, "model.dropout": 0.0,
                                "model.compile": mode == "compiled",
                                "train.out_dir": str(tmp_path / mode)}),
                        log=lambda *_: None, progress=False)
            for mode in ("eager", "compiled")}
    eager, compiled = (load_file(r.path / "checkpoints" / "step_000000004.safetensors")
                       for r in runs.values())
    # no "_orig_mod." prefixes: a compiled run's checkpoint loads anywhere
    assert eager.keys() == compiled.keys()
    apart = max((compiled[k] - eager[k]).abs().max().item()
                for k in eager if k.startswith("model/"))
    # fused kernels round differently (1.4e-5 here); each of the 4 Adam steps moves a weight
    # by ~lr = 2e-3
    assert apart < 2e-4
    for mode in ("eager", "compiled"):
        # reduce-overhead: on CPU no CUDA graphs, but the path that copies each output
        # (for them) runs
        flag = (["sample.compile=true", "sample.compile_mode=reduce-overhead"]
                if mode == "compiled" else [])
        assert main(["sample", str(runs["compiled"].path), "-n", "4", "--steps", "3", "--quiet",
                     "--out", str(tmp_path / f"gen_{mode}"), *flag]) == 0
    assert np.abs(_images(tmp_path / "gen_eager") - _images(tmp_path / "gen_compiled")).max() <= 1
