"""Peak RAM of training against dataset size, with the data in memory and streamed. Prints JSON.

    python benchmarks/data_memory.py                       # 10k and 100k random 64x64 RGB images
    python benchmarks/data_memory.py --sizes 10000,100000 --steps 20

Writes each dataset once as a .npy in --workdir, then trains a small model for --steps steps in a
fresh process per case (`data.stream=false` and `true`) and reports that process's peak resident
memory (ru_maxrss). The model is kept small so the data dominates what changes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import resource, sys, time
sys.path.insert(0, {src!r})
from ddpmkit.config import load_config
from ddpmkit.training import train
cfg = load_config(None, {overrides!r})
t0 = time.time()
train(cfg, log=lambda *_: None, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.time() - t0)
"""


def write_dataset(path: Path, n: int, size: int) -> None:
    """Random uint8 images written in chunks (the writer itself never holds the whole array)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    rng = np.random.default_rng(0)
    for i in range(0, n, 10_000):
        out[i:i + 10_000] = rng.integers(0, 256, out[i:i + 10_000].shape, dtype=np.uint8)
    out.flush()
    del out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workdir", default=None,
                    help="where the .npy files go (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ddpmkit_mem_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        data = work / f"random_{n}_{args.image_size}.npy"
        if not data.exists():
            write_dataset(data, n, args.image_size)
        for stream in (False, True):
            overrides = {"data.path": str(data), "data.image_size": args.image_size,
                         "data.stream": stream, "data.workers": 2, "model.base_channels": 16,
                         "model.norm_groups": 8, "model.channel_mult": [1, 2],
                         "model.num_res_blocks": 1, "train.batch_size": 32,
                         "train.max_steps": args.steps, "train.log_every": args.steps,
                         "train.grid_images": 1, "train.grid_steps": 1, "train.device": "cpu",
                         "train.out_dir": str(work / f"run_{n}_{stream}")}
            child = CHILD.format(src=str(ROOT / "src"), overrides=overrides)
            done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            peak_mb, worker_mb, seconds = map(float, done.stdout.split()[-3:])
            rows.append({"images": n, "dataset_mb": round(data.stat().st_size / 2**20),
                         "stream": stream, "peak_rss_mb": round(peak_mb),
                         "largest_worker_rss_mb": round(worker_mb), "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "image_size": args.image_size,
                      "steps": args.steps, "note": "peak RSS of the training process, and of its "
                                                   "largest child (a DataLoader worker)",
                      "results": rows},
                     indent=1))


if __name__ == "__main__":
    main()
