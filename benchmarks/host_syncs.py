"""Count host-device syncs in the training loop (CUDA sync debug mode), by ddpmkit source line.

    python benchmarks/host_syncs.py          # needs a CUDA GPU

60 steps with logging, grids and checkpoints only at the last step: any line listed more than once
would be a sync inside the step.
"""
import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.config import load_config  # noqa: E402
from ddpmkit.training import train  # noqa: E402

argparse.ArgumentParser(description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
seen = collections.Counter()
def record(message, category, filename, lineno, file=None, line=None):
    frames = [f for f in traceback.extract_stack() if "ddpmkit" in f.filename]
    seen[f"{frames[-1].filename.split('/')[-1]}:{frames[-1].lineno}" if frames else filename] += 1
warnings.showwarning = record
cfg = load_config(None,
                  {"train.max_steps": 60, "train.log_every": 1000, "train.sample_every": 10**6,
                   "train.checkpoint_every": 10**6, "train.out_dir": "/tmp/syncs",
                   "train.grid_images": 1, "train.grid_steps": 1})
torch.cuda.set_sync_debug_mode("warn")
train(cfg, fresh=True, log=print, progress=False)
torch.cuda.set_sync_debug_mode(0)
print("syncs during 60 steps (log, grid and checkpoint at the last step only):", dict(seen))
