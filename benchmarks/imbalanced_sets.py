"""Imbalanced study sets, as .npz files ddpmkit reads (train/val/test splits, labels as MedMNIST
stores them: in the two-class sets 0 is the rare class, 1 the common one).

    python benchmarks/imbalanced_sets.py fashion --out /tmp/sets/fashion_shirt.npz
    python benchmarks/imbalanced_sets.py cifar --out /tmp/sets/cifar_automobile.npz
    python benchmarks/imbalanced_sets.py digits --out /tmp/sets/digits_five.npz

fashion: Fashion-MNIST shirts (rare: 2% of the training split's, 120) against T-shirts/tops
(5,500), from `apt-get install dataset-fashion-mnist`. cifar: CIFAR-10 automobiles (rare: 2%, 100)
against trucks (4,500), from ../shared/data/cifar10-jpg. In both the val split is 500 other
training images of each class, and the test split is the official test images of the two classes
(1,000 each), so balanced accuracy weighs both classes alike. digits: ten classes, MNIST's 10,000
test digits (../shared/data/mnist-test) split per digit into 300 test, 50 val and the rest train
(608-785 images), except the fives, of which only 12 train (1.8% of the other digits' mean).
Nothing here is committed.
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

FASHION = Path("/usr/share/datasets/fashion-mnist")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR = SHARED / "cifar10-jpg" / "cifar10_jpg.tar.gz"
MNIST = SHARED / "mnist-test"
SETS = {"fashion": {"rare": 6, "common": 0, "rare_train": 120, "common_train": 5500},
        "cifar": {"rare": "automobile", "common": "truck", "rare_train": 100,
                  "common_train": 4500},
        "digits": {"rare": 5, "rare_train": 12, "val": 50, "test": 300}}
VAL = 500


def _idx(path: Path) -> np.ndarray:
    data = gzip.open(path).read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images, class ids), Fashion-MNIST's own."""
    if not FASHION.is_dir():
        sys.exit(f"Fashion-MNIST is not in {FASHION}: apt-get install dataset-fashion-mnist")
    return {split: (_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz"),
                    _idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz"))
            for split, prefix in (("train", "train"), ("test", "t10k"))}


def cifar(classes: tuple[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (images, class names) for the two classes, decoded from the JPEG tarball."""
    found: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    with tarfile.open(CIFAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-2] in classes:
                split = "test" if "test" in parts else "train"
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                found[split][0].append(np.asarray(image))
                found[split][1].append(parts[-2])
    return {split: (np.stack(images), np.array(labels))
            for split, (images, labels) in found.items()}


def build(splits: dict, rare, common, rare_train: int, common_train: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    train_images, train_labels = splits["train"]
    parts = {"train": [], "val": []}
    for cls, label, n in ((rare, 0, rare_train), (common, 1, common_train)):
        rows = rng.permutation(np.flatnonzero(train_labels == cls))
        parts["train"].append((train_images[rows[:n]], label))
        parts["val"].append((train_images[rows[n:n + VAL]], label))
    test_images, test_labels = splits["test"]
    parts["test"] = [(test_images[test_labels == cls], label)
                     for cls, label in ((rare, 0), (common, 1))]
    for split, chunks in parts.items():
        arrays[f"{split}_images"] = np.concatenate([images for images, _ in chunks])
        arrays[f"{split}_labels"] = np.concatenate(
            [np.full((len(images), 1), label, np.uint8) for images, label in chunks])
    return arrays


def digits(rare: int, rare_train: int, val: int, test: int, seed: int = 0) -> dict:
    """Ten classes from one set of images: per digit `test`, then `val` images, then the rest train
    (`rare_train` of them for the rare digit)."""
    images = _idx(MNIST / "t10k-images-idx3-ubyte.gz")
    labels = _idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        end = test + val + (rare_train if digit == rare else len(rows))
        for split, chosen in (("test", rows[:test]), ("val", rows[test:test + val]),
                              ("train", rows[test + val:end])):
            parts[split].append(chosen)
    return {f"{split}_{what}": array[np.concatenate(rows)].reshape(-1, *shape)
            for split, rows in parts.items()
            for what, array, shape in (("images", images, (28, 28)), ("labels", labels, (1,)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("set", choices=SETS)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    spec = SETS[args.set]
    if args.set == "digits":
        arrays = digits(**spec)
    else:
        splits = fashion() if args.set == "fashion" else cifar((spec["rare"], spec["common"]))
        arrays = build(splits, spec["rare"], spec["common"], spec["rare_train"],
                       spec["common_train"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, **arrays)
    print({k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
