"""Time to extract features of N images with each extractor on this machine. Prints JSON.

    python benchmarks/eval_speed.py                          # 10,000 images each
    python benchmarks/eval_speed.py --num 10000 --inception-num 1000

Images are MNIST-like 28x28 grayscale (random pixels: speed does not depend on content). The
Inception network runs with random weights when the standard file is absent (same cost). The
classifier's one-off training on the reference labels is timed separately (it is cached after).
`--inception-num` below --num times that many and scales linearly, saying so in the output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.metrics import features as fx  # noqa: E402
from ddpmkit.metrics.inception import FIDInceptionV3  # noqa: E402


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num", type=int, default=10_000)
    ap.add_argument("--inception-num", type=int, default=None, help="fewer images for Inception, scaled up")
    args = ap.parse_args()
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.num, 1, 28, 28), dtype=torch.uint8)
    labels = [str(i % 10) for i in range(args.num)]
    rows = []

    cpu = torch.device("cpu")
    net = FIDInceptionV3().eval()
    inception = fx.Extractor("inception", "", "", lambda x: net(fx.to_rgb(x)), device=cpu)
    n_inc = args.inception_num or args.num
    secs = timed(lambda: inception(images[:n_inc]))
    rows.append({"features": "inception", "images_timed": n_inc, "seconds": round(secs, 1),
                 f"seconds_per_{args.num}": round(secs * args.num / n_inc, 1), "extrapolated": n_inc != args.num})

    eff = fx.efficientnet(cpu)
    secs = timed(lambda: eff(images))
    rows.append({"features": "efficientnet", "images_timed": args.num, "seconds": round(secs, 1),
                 f"seconds_per_{args.num}": round(secs, 1), "extrapolated": False})

    with tempfile.TemporaryDirectory() as tmp:
        train_secs = timed(lambda: fx.classifier(images, labels, Path(tmp), log=lambda *_: None))
        clf = fx.classifier(images, labels, Path(tmp), log=lambda *_: None)
    secs = timed(lambda: clf(images))
    rows.append({"features": "classifier", "images_timed": args.num, "seconds": round(secs, 1),
                 f"seconds_per_{args.num}": round(secs, 1), "extrapolated": False,
                 "one_off_training_seconds": round(train_secs, 1)})
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "image": "28x28 grayscale", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
