"""Duplicates among the copy threshold's calibration images, with and without setting them aside.
Prints JSON.

    python benchmarks/duplicate_calibration.py [--pneumonia PATH]

For each set (the bundled digits at 16x16; PneumoniaMNIST's normal training X-rays at 16x16 when
../shared/data holds them), the training images are split in two: `train` and `held` (held out).
The probe: 300 training images re-saved as JPEG (quality 75), each a copy the audit should flag.
Calibrations, each measured with the rule (`duplicates` set aside, as `calibrate` does) and
without it (nothing set aside):
  - clean: leave-one-out on `train`, and on `held`;
  - train_twice: leave-one-out on `train` with 3% of its images saved a second time;
  - held_resaved: `held` plus JPEG (quality 95) re-saves of 3% as many training images.
Each row gives the threshold, the images set aside, the share of the probe flagged and, for the
leave-one-out rows, the share of `held` (real images the training split does not hold) flagged.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from ddpmkit.config import DataConfig  # noqa: E402
from ddpmkit.data import load_images, resize_center_crop  # noqa: E402
from ddpmkit.metrics import memorization  # noqa: E402

RULE = memorization.duplicates
PNEUMONIA = Path(__file__).resolve().parents[2] / "shared/data/pneumoniamnist/" \
    "pneumoniamnist_imbalanced.npz"


def jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[0].numpy()).save(buf, format="JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(buf)))[None])
    return torch.stack(out)


def sets(pneumonia: Path) -> dict[str, torch.Tensor]:
    found = {"digits": load_images(DataConfig(image_size=16), log=lambda *_: None).images}
    if pneumonia.is_file():
        data = np.load(pneumonia)
        normal = data["train_images"][data["train_labels"].ravel() == 0]
        found["pneumonia_normal"] = resize_center_crop(torch.from_numpy(normal)[:, None], 16)
    return found


def row(probe, train, held, new, rule: bool) -> dict:
    """The calibration on (train, held), the share of the probe it flags and, calibrated
    leave-one-out, the share of real images the run never saw (`new`) it flags: the false alarms
    that --share 0.01 promises to keep near 1%."""
    memorization.duplicates = RULE if rule else lambda found: np.zeros(len(found.d1), bool)
    result = memorization.audit(torch.cat([probe, new]), train, held)
    return {"threshold": round(result.calibration.threshold, 5),
            "set_aside": result.calibration.set_aside,
            "probe_flagged": round(float(result.copies[:len(probe)].mean()), 3),
            **({"new_flagged": round(float(result.copies[len(probe):].mean()), 4)}
               if held is None else {})}


def study(images: torch.Tensor) -> dict:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images = images[order]
    train, held = images[: len(images) * 2 // 3], images[len(images) * 2 // 3:]
    probe = jpeg(train[:300], 75)
    dup = max(1, round(0.03 * len(train)))
    cases = {"clean_leave_one_out": (train, None), "clean_held_out": (train, held),
             "train_twice": (torch.cat([train, train[-dup:]]), None),
             "held_resaved": (train, torch.cat([held, jpeg(train[-dup:], 95)]))}
    return {"train": len(train), "held": len(held), "duplicates": dup, **{
        name: {"with_rule": row(probe, t, h, held, True),
               "without_rule": row(probe, t, h, held, False)}
        for name, (t, h) in cases.items()}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pneumonia", type=Path, default=PNEUMONIA)
    found = sets(parser.parse_args().pneumonia)
    print(json.dumps({name: study(images) for name, images in found.items()}, indent=1))
