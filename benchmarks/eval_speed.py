"""Time to extract features of N images with each extractor on this machine. Prints JSON.

    python benchmarks/eval_speed.py                          # 10,000 images each (slow on a CPU)
    python benchmarks/eval_speed.py --timed 1000             # time 1,000 of them, scale to 10,000

Images are MNIST-like 28x28 grayscale (random pixels: speed does not depend on content). The
Inception network runs with random weights when the standard file is absent (same cost). The
classifier's one-off training on the reference labels is timed separately (it is cached after) on
--timed images. With --timed below --num, extraction times are scaled linearly (extraction is
per-image work in fixed batches) and marked "extrapolated".
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
    ap.add_argument("--num", type=int, default=10_000, help="report seconds per this many images")
    ap.add_argument("--timed", type=int, default=None, help="time this many and scale to --num")
    args = ap.parse_args()
    n = args.timed or args.num
    torch.manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    labels = [str(i % 10) for i in range(n)]
    cpu = torch.device("cpu")
    net = FIDInceptionV3().eval()
    with tempfile.TemporaryDirectory() as tmp:
        train_secs = timed(lambda: fx.classifier(images, labels, Path(tmp), log=lambda *_: None))
        extractors = {"inception": fx.Extractor("inception", "", "",
                                                lambda x: net(fx.to_rgb(x)), device=cpu),
                      "efficientnet": fx.efficientnet(cpu),
                      "classifier": fx.classifier(images, labels, Path(tmp), log=lambda *_: None)}
        rows = []
        for name, extractor in extractors.items():
            secs = timed(lambda: extractor(images))
            rows.append({"features": name, "images_timed": n, "seconds": round(secs, 1),
                         f"seconds_per_{args.num}": round(secs * args.num / n, 1),
                         "extrapolated": n != args.num, "images_per_sec": round(n / secs, 1)})
    rows[-1]["one_off_training_seconds"] = round(train_secs, 1)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                      "torch": torch.__version__,
                      "image": "28x28 grayscale", "results": rows}, indent=1))


if __name__ == "__main__":
    main()
