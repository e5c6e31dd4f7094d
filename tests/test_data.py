import gzip
import json
import shutil
import struct
import unicodedata
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import SHARED_DATA, TINY, write_images
from ddpmkit.cli import main
from ddpmkit.config import DataConfig, data_config, load_config
from ddpmkit.data import batch_to_model, load_images, resize_center_crop
from ddpmkit.pixels import array_to_uint8_nchw, value_scale
from ddpmkit.errors import UserError


def test_default_is_sklearn_digits_native_size():
    d = load_images(DataConfig())
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.uint8
    assert d.images.max() == 255 and d.images.min() == 0
    assert sorted(set(d.labels)) == [str(i) for i in range(10)]


def test_folder_grayscale_stays_grayscale_and_is_resized(tmp_path):
    write_images(tmp_path / "a", 5, size=(20, 10))
    write_images(tmp_path / "a" / "nested", 3, size=(16, 16), seed=1)
    d = load_images(DataConfig(path=str(tmp_path / "a"), image_size=8))
    assert d.images.shape == (8, 1, 8, 8)


def test_folder_rgb_and_forced_channels(tmp_path):
    write_images(tmp_path, 4, mode="RGB")
    assert load_images(DataConfig(path=str(tmp_path), image_size=8)).images.shape == (4, 3, 8, 8)
    assert (load_images(DataConfig(path=str(tmp_path), image_size=8, channels=1)).images.shape
            == (4, 1, 8, 8))


def test_mixed_modes_become_one_format(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (9, 9, 4), dtype=np.uint8), "RGBA").save(
        tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (9, 9), dtype=np.uint8)).convert("P").save(
        tmp_path / "pal.png")
    Image.fromarray(rng.integers(0, 65535, (9, 9), dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(rng.integers(0, 255, (12, 7), dtype=np.uint8)).save(tmp_path / "gray.jpg")
    d = load_images(DataConfig(path=str(tmp_path), image_size=8))
    assert d.images.shape == (5, 3, 8, 8)


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    stored = np.zeros((16, 16), np.uint8)
    stored[:, :8] = 255  # left half white as stored; orientation 6 shows it rotated a quarter turn
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg")))
    d = load_images(DataConfig(path=str(tmp_path), image_size=16))
    assert np.array_equal(d.images[0, 0].numpy(), shown) and shown[0].mean() > 250


def test_sixteen_bit_colour_files_are_refused_not_read_to_their_top_byte(tmp_path):
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = b"".join(b"\0" + np.full((4, 3), 4095, ">u2").tobytes() for _ in range(4))
    (tmp_path / "rgb16.png").write_bytes(  # Pillow cannot write one: 12-bit white, RGB, 16 bits
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with pytest.raises(UserError, match="rgb16.png is a 16-bit colour image, which the image "
                                        "library reads only to 8 bits: save the set as a uint16"):
        load_images(DataConfig(path=str(tmp_path), image_size=4))
    (tmp_path / "rgb16.png").unlink()
    rows = b"".join(b"\0" + np.full((4, 2), 4095, ">u2").tobytes() for _ in range(4))
    (tmp_path / "la16.png").write_bytes(  # gray and alpha, 16 bits: Pillow opens it as RGBA
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 4, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    with pytest.raises(UserError, match="la16.png is a 16-bit gray image with transparency"):
        load_images(DataConfig(path=str(tmp_path), image_size=4))


def test_a_gray_image_saved_with_a_palette_reads_as_gray(tmp_path):
    im = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).convert("P")
    im.putpalette([v for i in range(256) for v in (i, i, i)])
    im.save(tmp_path / "gray_palette.png")
    d = load_images(DataConfig(path=str(tmp_path), image_size=8))
    assert d.images.shape == (1, 1, 8, 8)
    assert d.images[0, 0].flatten().tolist() == list(range(0, 256, 4))
    im.putpalette([v for i in range(256) for v in (i, 0, 0)])  # a red palette stays colour
    im.save(tmp_path / "gray_palette.png")
    assert load_images(DataConfig(path=str(tmp_path), image_size=8)).images.shape == (1, 3, 8, 8)


def test_sixteen_bit_images_scale_to_eight(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    d = load_images(DataConfig(path=str(tmp_path), image_size=8))
    assert d.images.shape == (1, 1, 8, 8) and int(d.images.min()) == 255


def test_twelve_bit_values_in_sixteen_bit_files_are_read_as_twelve_bit(tmp_path):
    # a 12-bit detector's X-rays saved as 16-bit PNGs: read as 16-bit they would be nearly black
    Image.fromarray(np.full((8, 8), 4095, dtype=np.uint16)).save(tmp_path / "white12.png")
    Image.fromarray(np.full((8, 8), 2048, dtype=np.uint16)).save(tmp_path / "grey12.png")
    d = load_images(DataConfig(path=str(tmp_path), image_size=8))
    # files sort grey12, white12
    assert sorted(int(v) for v in d.images.amax((1, 2, 3))) == [128, 255]
    assert "12-bit values (largest 4095" in d.source
    forced = load_images(DataConfig(path=str(tmp_path), image_size=8, bit_depth=16))
    assert sorted(int(v) for v in forced.images.amax((1, 2, 3))) == [8, 16]  # 2048/257, 4095/257
    with pytest.raises(UserError, match=r"values up to 4095 do not fit data.bit_depth=10 "
                                        r"\(yours, .*\): use at least 12 bits"):
        load_images(DataConfig(path=str(tmp_path), image_size=8, bit_depth=10))


def test_a_dark_sixteen_bit_image_is_scaled_with_its_dataset_not_on_its_own(tmp_path):
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(tmp_path / "dark.png")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "white.png")
    d = load_images(DataConfig(path=str(tmp_path), image_size=8))
    assert [int(v) for v in d.images.amax((1, 2, 3))] == [1, 255]  # 200/257, not 200 as if 8-bit


def test_wide_integer_arrays_take_one_bit_depth_for_the_whole_file(tmp_path):
    arr = np.zeros((3, 8, 8), dtype=np.uint16)
    arr[0], arr[1], arr[2] = 1023, 100, 0  # 10-bit data
    np.save(tmp_path / "ten.npy", arr)
    d = load_images(DataConfig(path=str(tmp_path / "ten.npy"), image_size=8))
    assert [int(v) for v in d.images.amax((1, 2, 3))] == [255, 25, 0] and "10-bit" in d.source
    assert int(array_to_uint8_nchw(arr, "x", value_scale(arr, "x", bit_depth=16)).max()) == 4
    # 8-bit data in a wide type stays as it is
    eight_bit_values = np.full((2, 8, 8), 255, dtype=np.int32)
    assert int(array_to_uint8_nchw(eight_bit_values, "x").min()) == 255


def test_float_and_signed_image_files_beyond_the_usual_ranges_load_as_clipped_integers(tmp_path):
    # a float TIFF of raw counts and a 32-bit TIFF with negative values (CT in Hounsfield units):
    # read as integers clipped to 0..65535, at the depth of their largest value, and said so;
    # arrays are refused
    Image.fromarray(np.full((8, 8), 3000.0, dtype=np.float32)).save(tmp_path / "counts.tif")
    d = load_images(DataConfig(path=str(tmp_path), image_size=8))
    assert (int(d.images.max()) == round(3000 * 255 / 4095) and "12-bit values" in d.source
            and d.bit_depth == 12)
    (tmp_path / "counts.tif").unlink()
    Image.fromarray(np.array([[-1000] * 4 + [1000] * 4] * 8, dtype=np.int32)).save(
        tmp_path / "hu.tif")
    d = load_images(DataConfig(path=str(tmp_path), image_size=8))
    # 10-bit: largest 1000
    assert sorted(set(d.images.flatten().tolist())) == [0, round(1000 * 255 / 1023)]
    assert "clipped from [-1000, 1000]" in d.source
    with pytest.raises(UserError, match="integer values in"):
        array_to_uint8_nchw(np.full((1, 8, 8), -5, dtype=np.int32), "x")
    (tmp_path / "hu.tif").unlink()
    # a float TIFF of [0, 1] data a little past 1 is refused, not read nearly black
    Image.fromarray(np.linspace(0, 1.2, 64, dtype=np.float32).reshape(8, 8)).save(
        tmp_path / "ratio.tif")
    with pytest.raises(UserError, match=r"float values in \[0, 1.2\] are past \[0,1\]"):
        load_images(DataConfig(path=str(tmp_path), image_size=8))


def test_the_scale_ignores_alpha_and_labels_name_folder_images_only(tmp_path):
    rgba = np.zeros((2, 8, 8, 4), dtype=np.uint16)
    rgba[..., :3], rgba[..., 3] = 4095, 65535  # 12-bit colour, opaque 16-bit alpha
    np.save(tmp_path / "rgba.npy", rgba)
    d = load_images(DataConfig(path=str(tmp_path / "rgba.npy"), image_size=8))
    assert int(d.images.min()) == 255 and d.bit_depth == 12
    np.savez(tmp_path / "d.npz", train_images=rgba[..., 0], train_labels=np.array([0, 1]))
    (tmp_path / "labels.csv").write_text("image,label\na,0\n")
    with pytest.raises(UserError, match="names images in a folder"):
        load_images(DataConfig(path=str(tmp_path / "d.npz"), labels=str(tmp_path / "labels.csv")))


def test_mixed_wide_kinds_share_one_depth(tmp_path):
    # a float TIFF beyond the usual ranges is read as integers, at the same depth as the 16-bit PNGs
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.full((8, 8), 40000.0, dtype=np.float32)).save(tmp_path / "mixed" / "a.tif")
    Image.fromarray(np.full((8, 8), 3000, dtype=np.uint16)).save(tmp_path / "mixed" / "b.png")
    d = load_images(DataConfig(path=str(tmp_path / "mixed"), image_size=8))
    assert ([int(v) for v in d.images.amax((1, 2, 3))] == [round(40000 / 257), round(3000 / 257)]
            and d.bit_depth == 16)


def test_unreadable_images_are_skipped_and_reported_or_fail(tmp_path):
    write_images(tmp_path, 3)
    (tmp_path / "empty.png").write_bytes(b"")
    good = (tmp_path / "img_000.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_images(DataConfig(path=str(tmp_path), image_size=8))
    assert (len(d) == 3
            and sorted(p.split("/")[-1] for p, _ in d.skipped) == ["empty.png", "truncated.png"])
    with pytest.raises(UserError, match="cannot read image"):
        load_images(DataConfig(path=str(tmp_path), image_size=8, on_error="fail"))


def test_csv_filters_by_label_with_or_without_extensions(tmp_path):
    write_images(tmp_path / "imgs", 6)
    rows = ["image_name,target"] + [f"img_{i:03d}{'.png' if i % 2 else ''},{i % 3 == 0:d}"
                                    for i in range(6)]
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(path=str(tmp_path / "imgs"), labels=str(tmp_path / "meta.csv"),
                     image_column="image_name", label_column="target", filter_label="1",
                     image_size=8)
    d = load_images(cfg)
    assert len(d) == 2 and d.labels == ["1", "1"]
    assert d.source == f"2 images from {tmp_path / 'imgs'} (labelled by {tmp_path / 'meta.csv'})"


def test_filter_label_keeps_one_class_of_arrays_and_class_folders_and_names_where_each_was(
        tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", train_images=rng.integers(0, 255, (9, 8, 8), dtype=np.uint8),
             train_labels=np.arange(9) % 3)
    d = load_images(DataConfig(path=str(tmp_path / "s.npz"), image_size=8, filter_label="1"))
    assert d.labels == ["1"] * 3 and [o.split("#")[1] for o in d.origins()] == ["1", "4", "7"]
    write_images(tmp_path / "folders" / "cat", 2)
    write_images(tmp_path / "folders" / "dog", 3)
    d = load_images(DataConfig(path=str(tmp_path / "folders"), image_size=8, filter_label="dog"))
    assert len(d) == 3 and all("/dog/" in f for f in d.files)
    with pytest.raises(UserError, match="no image in .* has it .labels present: 0, 1, 2."):
        load_images(DataConfig(path=str(tmp_path / "s.npz"), image_size=8, filter_label="7"))
    np.save(tmp_path / "u.npy", rng.integers(0, 255, (4, 8, 8), dtype=np.uint8))
    with pytest.raises(UserError, match="u.npy has no labels to choose from"):
        load_images(DataConfig(path=str(tmp_path / "u.npy"), image_size=8, filter_label="1"))


def test_labels_read_decomposed_are_one_class_with_their_composed_spelling(tmp_path):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "l.csv").write_text("image,label\nimg_000,n\u0303andu\u0301\n"
                                    "img_001,\u00f1and\u00fa\nimg_002,cat\n", encoding="utf-8")
    d = load_images(data_config({"data.path": str(tmp_path / "imgs"), "data.image_size": 8,
                                 "data.labels": str(tmp_path / "l.csv"),
                                 "data.filter_label": "n\u0303andu\u0301"}))  # as --data reads it
    assert d.labels == ["\u00f1and\u00fa"] * 2


def test_rows_naming_missing_files_are_skipped_and_said_or_refused(tmp_path, capsys):
    """As an unreadable file is: left out with a warning (data.on_error=skip), or refused."""
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "l.csv").write_text("image,label\nimg_000.png,1\nimg_999.png,1\n")
    cfg = DataConfig(path=str(tmp_path / "imgs"), labels=str(tmp_path / "l.csv"), image_size=8)
    assert len(load_images(cfg)) == 1
    assert "names 1 image(s) not found under" in capsys.readouterr().out
    with pytest.raises(UserError, match="img_999.png; remove their rows, or put the files there"):
        load_images(replace(cfg, on_error="fail"))


@pytest.mark.parametrize("content,message", [
    ("name,label\nimg_000.png,1\n", "no column 'image'"),
    ("image,label\nimg_000.png,1\nimg_000.png,1\n", "listed twice"),
    ("image,label\nimg_000.png,1\nimg_000,1\n",  # one file, spelt two ways
     "'img_000' is img_000.png, which an earlier row lists too"),
    ("image,label\nimg_000.png,1\n./img_000.png,1\n", "which an earlier row lists too"),
    ("image,label\n../../etc/passwd,1\n", "outside the data folder"),
    ("image,label\n/etc/passwd,1\n", "outside the data folder"),
    ("image,label\nimg_000.png,0\n", "no rows"),
    ("image,label\nimg_000.png,1,benign\n",
     "data row 1 has 3 values where the header names 2 columns: quote"),
    ("image,label\nimg_001.png,1\nimg_000.png\n", "data row 2 has 1 values where"),
    # csv.DictReader keeps the last of two columns of one name: refused, not guessed
    ("image,label,label\nimg_000.png,1,x\n", "names column 'label' twice: rename or remove one"),
    ("image,label\n,1\nimg_000.png,1\n", "data row 1 names no image .its image is empty."),
])
def test_bad_csvs_are_named(tmp_path, content, message):
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "l.csv").write_text(content)
    cfg = DataConfig(path=str(tmp_path / "imgs"), labels=str(tmp_path / "l.csv"), image_size=8,
                     filter_label="1")
    with pytest.raises(UserError, match=message):
        load_images(cfg)


@pytest.mark.parametrize("shape", [(5, 12, 12), (5, 12, 12, 1), (5, 1, 12, 12), (5, 12, 12, 3),
                                   (5, 3, 12, 12)])
def test_array_layouts(tmp_path, shape):
    arr = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    np.save(tmp_path / "x.npy", arr)
    d = load_images(DataConfig(path=str(tmp_path / "x.npy"), image_size=12))
    c = 3 if 3 in shape[1:] else 1
    assert d.images.shape == (5, c, 12, 12)
    expected = (arr.reshape(5, 12, 12, -1).transpose(0, 3, 1, 2) if shape[-1] in (1, 3)
                else arr.reshape(5, c, 12, 12))
    assert torch.equal(d.images, torch.from_numpy(np.ascontiguousarray(expected)))


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-1.0, 1.0), (0.0, 255.0)])
def test_float_ranges_map_to_uint8(lo, hi):
    arr = np.linspace(lo, hi, 2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    out = array_to_uint8_nchw(arr, "x")
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("arr,message", [
    (np.full((2, 4, 4), np.nan, dtype=np.float32), "NaN"),
    (np.zeros((4, 4)), "expected"),
    (np.zeros((2, 5, 5, 7)), "no channel axis"),
    (np.full((2, 4, 4), 300.0), "float values"),
    (np.linspace(0, 1.5, 32).reshape(2, 4, 4),
     r"float values in \[0, 1.5\] are past \[0,1\] yet would be nearly black"),
    (np.linspace(0, 1.0001, 32).reshape(2, 4, 4), r"float values in \[0, 1.0001\] are past"),
    # [0, 1] data with a rounding error below 0: read as [-1, 1] it would be washed out
    (np.linspace(-1e-6, 1, 32).reshape(2, 4, 4), r"float values in \[-1e-06, 1\] are barely "
                                                 r"below 0: read as \[-1,1\] every image"),
    (np.zeros((0, 4, 4), dtype=np.uint8), "no images"),
])
def test_bad_arrays(arr, message):
    with pytest.raises(UserError, match=message):
        array_to_uint8_nchw(arr, "x")


def test_npz_medmnist_style_with_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", train_images=rng.integers(0, 255, (7, 28, 28), dtype=np.uint8),
             train_labels=np.arange(7).reshape(7, 1),
             test_images=np.zeros((3, 28, 28), dtype=np.uint8))
    d = load_images(DataConfig(path=str(tmp_path / "d.npz"), image_size=28))
    assert d.images.shape == (7, 1, 28, 28) and d.labels == [str(i) for i in range(7)]
    assert len(load_images(DataConfig(path=str(tmp_path / "d.npz"), image_size=28,
                                      split="test"))) == 3
    with pytest.raises(UserError, match="val_images"):
        load_images(DataConfig(path=str(tmp_path / "d.npz"), image_size=28, split="val"))


def test_a_named_split_is_never_stood_in_for_by_the_training_images(tmp_path):
    from ddpmkit.streaming import open_stream

    images = np.zeros((5, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images=images)
    # the default split
    assert len(load_images(DataConfig(path=str(tmp_path / "plain.npz"), image_size=8))) == 5
    with pytest.raises(UserError, match="plain.npz has no 'test' split"):
        load_images(DataConfig(path=str(tmp_path / "plain.npz"), image_size=8, split="test"))
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    with pytest.raises(UserError, match="has no 'test' split: no test/t10k IDX image file"):
        load_images(DataConfig(path=str(tmp_path), image_size=8, split="test"))
    with pytest.raises(UserError, match="IDX files hold 'train' and 'test'"):
        load_images(DataConfig(path=str(tmp_path), image_size=8, split="val"))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:2])
    assert len(load_images(DataConfig(path=str(tmp_path), image_size=8, split="test"))) == 2
    # a lone file names its own split: an .npy has none, an IDX file is the one its name says
    np.save(tmp_path / "one.npy", images)
    for stream in (False, True):
        with pytest.raises(UserError,
                           match="data.split=test: .*one.npy is one array with no splits"):
            cfg = DataConfig(path=str(tmp_path / "one.npy"), image_size=8, split="test",
                             stream=stream)
            open_stream(cfg) if stream else load_images(cfg)
    with pytest.raises(UserError, match="data.split=test: .*train-images-idx3-ubyte.gz is one "
                                        "IDX file, not the test split"):
        load_images(DataConfig(path=str(tmp_path / "train-images-idx3-ubyte.gz"), image_size=8,
                               split="test"))
    assert len(load_images(DataConfig(path=str(tmp_path / "t10k-images-idx3-ubyte.gz"),
                                      image_size=8, split="test"))) == 2
    emnist = tmp_path / "emnist"  # EMNIST names its splits inside the name
    emnist.mkdir()
    _write_idx(emnist / "emnist-balanced-train-images-idx3-ubyte", images, gz=False)
    _write_idx(emnist / "emnist-balanced-test-images-idx3-ubyte", images[:3], gz=False)
    assert [len(load_images(DataConfig(path=str(emnist), image_size=8, split=s)))
            for s in ("train", "test")] == [5, 3]


def test_a_folder_split_into_train_and_test_is_read_one_split_at_a_time(tmp_path):
    """chest_xray/{train,test}/{NORMAL,PNEUMONIA}/: the splits are not classes, and test images
    are not trained on."""
    from ddpmkit.data import has_named_splits
    from ddpmkit.streaming import open_stream

    root = tmp_path / "chest_xray"
    for split, n in (("train", 5), ("test", 3)):
        for cls in ("NORMAL", "PNEUMONIA"):
            write_images(root / split / cls, n=n, size=(8, 8), seed=len(split) + len(cls))
    (root / ".DS_Store").write_bytes(b"")  # hidden files and a README do not make it a plain folder
    (root / "README.txt").write_text("Chest X-rays, split by patient")
    train = load_images(DataConfig(path=str(root), image_size=8))
    assert len(train) == 10 and sorted(set(train.labels)) == ["NORMAL", "PNEUMONIA"]
    assert train.source_path == str(root / "train")
    test = load_images(DataConfig(path=str(root), split="test", image_size=8))
    assert len(test) == 6 and sorted(set(test.labels)) == ["NORMAL", "PNEUMONIA"]
    assert len(open_stream(DataConfig(path=str(root), image_size=8, stream=True))) == 10
    with pytest.raises(UserError, match=r"chest_xray is split into test, train and has no 'val' "
                                        r"split: set data.split"):
        load_images(DataConfig(path=str(root), split="val", image_size=8))
    with pytest.raises(UserError, match=r"data.split=val: .*NORMAL has no splits "
                                        r"\(no train/val/test folders\)"):
        load_images(DataConfig(path=str(root / "train" / "NORMAL"), split="val", image_size=8))
    assert has_named_splits(root) and not has_named_splits(root / "test")
    labels = root / "train" / "labels.csv"  # a CSV names the images: another CSV names the split
    labels.write_text("image,label\nNORMAL/0.png,NORMAL\n")
    with pytest.raises(UserError, match=r"give the CSV naming the val images as data.labels"):
        load_images(DataConfig(path=str(root / "train"), labels=str(labels), split="val",
                               image_size=8))


def test_folders_beside_the_splits_do_not_turn_them_into_classes(tmp_path):
    """Samples written into the data folder, or an empty folder, leave it split; another folder
    of images beside the splits is refused rather than making train/ and test/ two classes."""
    root = tmp_path / "set"
    for split, n in (("train", 5), ("test", 3)):
        for cls in ("cat", "dog"):
            write_images(root / split / cls, n=n, size=(8, 8), seed=len(split) + len(cls))
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(run), "--quiet", "train.max_steps=2",
                 *[f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                   for k, v in TINY.items()]]) == 0
    assert main(["sample", str(run), "-n", "2", "--steps", "2", "--out", str(root / "generated"),
                 "--quiet"]) == 0
    (root / "checkpoints").mkdir()
    train = load_images(DataConfig(path=str(root), image_size=8), log=lambda *_: None)
    assert len(train) == 10 and sorted(set(train.labels)) == ["cat", "dog"]
    assert len(load_images(DataConfig(path=str(root), split="test", image_size=8))) == 6
    write_images(root / "extra", n=2, size=(8, 8))
    with pytest.raises(UserError, match=r"set holds split folders \(test, train\) and, beside "
                                        r"them, folders of images \(extra\): move those out"):
        load_images(DataConfig(path=str(root), image_size=8))
    # class folders that are links still make splits; a lone class named "train" is a class
    linked = tmp_path / "linked"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (linked / split).mkdir(parents=True, exist_ok=True)
            (linked / split / cls).symlink_to(root / split / cls)
    assert len(load_images(DataConfig(path=str(linked), image_size=8))) == 10
    classes = tmp_path / "classes"
    for cls in ("bus", "train", "tank"):
        write_images(classes / cls, n=2, size=(8, 8))
    assert sorted(set(load_images(DataConfig(path=str(classes), image_size=8)).labels)) == [
        "bus", "tank", "train"]
    (root / "extra" / "img_000.png").rename(root / "cover.png")  # a dataset's preview image
    shutil.rmtree(root / "extra")
    with pytest.raises(UserError, match=r"and, beside them, images \(cover.png\): move those"):
        load_images(DataConfig(path=str(root), image_size=8))
    (root / "cover.png").unlink()
    for split in ("train", "test"):  # Kaggle's Training/Testing are splits, not two classes
        (root / split).rename(root / split.title().replace("Train", "Training")
                              .replace("Test", "Testing"))
    with pytest.raises(UserError, match=r"is split into Testing, Training and has no 'train'"):
        load_images(DataConfig(path=str(root), image_size=8))
    assert len(load_images(DataConfig(path=str(root), split="training", image_size=8))) == 10


def test_pickled_object_arrays_are_refused(tmp_path):
    np.save(tmp_path / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="cannot read"):
        load_images(DataConfig(path=str(tmp_path / "evil.npy")))


def _write_idx(path, arr, gz=True):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_idx_files_gz_or_not_and_folders(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1]))
    _write_idx(tmp_path / "raw-idx3-ubyte", imgs, gz=False)
    d = load_images(DataConfig(path=str(tmp_path / "train-images-idx3-ubyte.gz"), image_size=28))
    assert torch.equal(d.images[:, 0], torch.from_numpy(imgs)) and d.labels == ["3", "1", "4", "1"]
    assert len(load_images(DataConfig(path=str(tmp_path / "raw-idx3-ubyte"), image_size=28))) == 4
    assert len(load_images(DataConfig(path=str(tmp_path), image_size=28))) == 4  # picks train-*
    (tmp_path / "raw-idx3-ubyte").unlink()
    # a checksum beside the images is not taken for a second IDX file
    (tmp_path / "train-images-idx3-ubyte.gz.md5").write_text("0123 train-images-idx3-ubyte.gz\n")
    assert len(load_images(DataConfig(path=str(tmp_path), image_size=28))) == 4
    (tmp_path / "bad-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + struct.pack(">3I", 4, 28, 28) + b"\x00" * 10)
    with pytest.raises(UserError, match="truncated"):
        load_images(DataConfig(path=str(tmp_path / "bad-idx3-ubyte"), image_size=28))


@pytest.mark.skipif(not (SHARED_DATA / "mnist-test").is_dir(),
                    reason="../shared/data/mnist-test not present")
def test_real_mnist_idx():
    d = load_images(DataConfig(path=str(SHARED_DATA / "mnist-test" / "t10k-images-idx3-ubyte.gz"),
                               image_size=28))
    assert d.images.shape == (10000, 1, 28, 28) and len(d.labels) == 10000


@pytest.mark.parametrize("path,message", [("missing_dir", "not found"), ("empty", "no images")])
def test_missing_and_empty(tmp_path, path, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=message):
        load_images(DataConfig(path=str(tmp_path / path)))


def test_resize_center_crop_and_batch_scaling():
    x = torch.zeros(1, 1, 10, 20, dtype=torch.uint8)
    x[..., :, 5:15] = 255  # a centred white square in a wide image
    out = resize_center_crop(x, 10)
    assert out.shape == (1, 1, 10, 10) and out.float().mean() > 240
    scaled = batch_to_model(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
    assert scaled.flatten().tolist() == [-1.0, 1.0]
    flip = torch.arange(16) % 3 == 0
    flipped = batch_to_model(torch.arange(64, dtype=torch.uint8).view(16, 1, 2, 2), flip)
    # exactly the masked ones mirrored
    assert torch.equal(flipped[:, 0, 0, 0] > flipped[:, 0, 0, 1], flip)


def test_malformed_user_data_gets_one_clear_line(tmp_path):
    from ddpmkit.config import load_config
    from ddpmkit.resolve import _class_ids

    """Each of these raised a traceback (UnicodeDecodeError, a numpy reshape error, an IndexError
    mid-training, struct.error) or, for one-hot labels, silently trained on column 0."""
    write_images(tmp_path / "imgs", n=3, size=(8, 8))
    csv_path = tmp_path / "labels.csv"
    csv_path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="not UTF-8"):
        load_images(DataConfig(path=str(tmp_path / "imgs"), labels=str(csv_path)))
    csv_path.write_text("image,label\nimg_000.png,a\nimg_001.png,\n")
    assert load_images(DataConfig(path=str(tmp_path / "imgs"),
                                  labels=str(csv_path))).labels == ["a", ""]
    with pytest.raises(UserError, match=r"1 image\(s\) have an empty label \(img_001.png first\)"):
        _class_ids(load_config(None, {"data.path": str(tmp_path / "imgs"),
                                      "data.labels": str(csv_path)}),
                   load_images(DataConfig(path=str(tmp_path / "imgs"), labels=str(csv_path))))

    images = np.zeros((10, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "few.npz", train_images=images, train_labels=np.arange(7))
    with pytest.raises(UserError, match=r"few.npz\[train_labels\] holds 7 labels for 10 images"):
        load_images(DataConfig(path=str(tmp_path / "few.npz")))
    np.savez(tmp_path / "onehot.npz", train_images=images,
             train_labels=np.eye(3)[np.arange(10) % 3])
    with pytest.raises(UserError, match=r"shape \(10, 3\): one-hot"):
        load_images(DataConfig(path=str(tmp_path / "onehot.npz")))
    np.savez(tmp_path / "column.npz", train_images=images, train_labels=np.arange(10)[:, None])
    assert load_images(DataConfig(path=str(tmp_path / "column.npz"))).labels[:3] == ["0", "1", "2"]
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(UserError, match="not a NumPy array file") as err:
        load_images(DataConfig(path=str(tmp_path / "text.npy")))
    assert "allow_pickle" not in str(err.value)

    idx = tmp_path / "idx"
    idx.mkdir()
    _write_idx(idx / "train-images-idx3-ubyte.gz", np.zeros((20, 8, 8)))
    _write_idx(idx / "train-labels-idx1-ubyte.gz", np.arange(10))
    with pytest.raises(UserError, match="holds 10 labels for the 20 images"):
        load_images(DataConfig(path=str(idx)))
    (tmp_path / "short-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03")
    with pytest.raises(UserError, match="header ends early"):
        load_images(DataConfig(path=str(tmp_path / "short-idx3-ubyte")))


def test_a_careless_dataset_is_one_clear_line(tmp_path):
    images = np.zeros((4, 8, 8), dtype=np.uint8)
    test_only = tmp_path / "mnist-test"  # MNIST's test file alone is not a training split
    test_only.mkdir()
    _write_idx(test_only / "t10k-images-idx3-ubyte.gz", images)
    with pytest.raises(UserError, match="has no 'train' split, only t10k-images-idx3-ubyte.gz"):
        load_images(DataConfig(path=str(test_only), image_size=8))
    assert len(load_images(DataConfig(path=str(test_only), image_size=8, split="test"))) == 4
    np.savez(tmp_path / "scores.npz", train_images=images, train_labels=np.array([0.5, 1, 2, 3]))
    with pytest.raises(UserError, match=r"holds fractional values \(e.g. 0.5\): labels name"):
        load_images(DataConfig(path=str(tmp_path / "scores.npz"), image_size=8))
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "a.png")
    (tmp_path / "header.csv").write_text("image,label\n")
    with pytest.raises(UserError, match="header.csv lists none of the 1 images under"):
        load_images(DataConfig(path=str(folder), labels=str(tmp_path / "header.csv"),
                               image_size=8))
    with pytest.raises(UserError, match="is a folder, not a config file: .* --data"):
        load_config(str(folder))
    with pytest.raises(UserError, match="the bundled digits .* have no splits"):
        load_images(DataConfig(image_size=8, split="test"))


def test_a_class_whose_every_image_is_unreadable_is_named_when_skipped(tmp_path):
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "l.csv").write_text("image,label\nimg_000,a\nimg_001,a\nimg_002,b\n"
                                    "broken.png,rare thing\n")
    said = []
    d = load_images(DataConfig(path=str(tmp_path / "imgs"), labels=str(tmp_path / "l.csv"),
                               image_size=8, on_error="skip"), log=said.append)
    assert sorted(set(d.labels)) == ["a", "b"]
    assert any("every image of class rare thing was unreadable" in m for m in said), said


def test_a_labels_csv_header_with_spaces_and_a_chosen_class_are_read_as_written(tmp_path):
    """A hand-written header 'image, label' names the columns image and label; data.filter_label
    on class folders says how many images it kept, not the folder's count."""
    write_images(tmp_path / "imgs", 3)
    (tmp_path / "l.csv").write_text("image, label\nimg_000.png, a\nimg_001.png, b\n")
    d = load_images(DataConfig(path=str(tmp_path / "imgs"), labels=str(tmp_path / "l.csv"),
                               image_size=8))
    assert d.labels == ["a", "b"]
    for name in ("a", "b"):
        write_images(tmp_path / "classes" / name, 2 if name == "a" else 3)
    d = load_images(DataConfig(path=str(tmp_path / "classes"), image_size=8, filter_label="a"))
    assert len(d) == 2 and d.source.startswith("2 images labelled a of 5 images from ")


def _gray(path, value=0, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def test_hidden_folders_are_no_class_and_linked_class_folders_are_followed(tmp_path):
    """A notebook's .ipynb_checkpoints copy is neither a class nor a second training image, a
    macOS ._ file is not an image, and a class folder that is a link is read (once, even when a
    link loops back)."""
    import os

    data = tmp_path / "data"
    for name in ("cat/1.png", "cat/.ipynb_checkpoints/1-checkpoint.png",
                 ".ipynb_checkpoints/2.png"):
        _gray(data / name)
    (data / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble
    _gray(tmp_path / "elsewhere" / "dog" / "3.png")
    os.symlink(tmp_path / "elsewhere" / "dog", data / "dog")
    os.symlink(data, data / "dog" / "loop")  # a link back up: read once, no endless walk
    loaded = load_images(DataConfig(path=str(data), on_error="fail"), log=lambda *_: None)
    assert loaded.labels == ["cat", "dog"]
    assert [f.split("data/")[1] for f in loaded.files] == ["cat/1.png", "dog/3.png"]


def test_a_streamed_folder_takes_filter_label_as_memory_does(tmp_path):
    from ddpmkit.streaming import open_stream

    for name in ("cat/1.png", "cat/2.png", "dog/3.png"):
        _gray(tmp_path / "d" / name)
    cfg = DataConfig(path=str(tmp_path / "d"), filter_label="cat", stream=True)
    assert len(open_stream(cfg, log=lambda *_: None)) == 2 == len(load_images(cfg, lambda *_: 0))
    with pytest.raises(UserError, match="data.filter_label=zebra: no image in .* has it"):
        open_stream(DataConfig(path=str(tmp_path / "d"), filter_label="zebra", stream=True))
    np.save(tmp_path / "a.npy", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UserError, match="data.filter_label=cat: .*a.npy has no labels"):
        open_stream(DataConfig(path=str(tmp_path / "a.npy"), filter_label="cat", stream=True))


def test_labels_in_other_spellings_name_their_classes(tmp_path):
    """Kaggle's train-images.idx3-ubyte finds train-labels.idx1-ubyte; byte-string labels in an
    .npz name cat, not b'cat'; an .npz's labels are stripped as a CSV's are."""
    (tmp_path / "kaggle").mkdir()
    _write_idx(tmp_path / "kaggle" / "train-images.idx3-ubyte", np.zeros((3, 8, 8)), gz=False)
    _write_idx(tmp_path / "kaggle" / "train-labels.idx1-ubyte", np.array([1, 2, 3]), gz=False)
    assert load_images(DataConfig(path=str(tmp_path / "kaggle"))).labels == ["1", "2", "3"]
    np.savez(tmp_path / "b.npz", train_images=np.zeros((3, 8, 8), np.uint8),
             train_labels=np.array([b"cat", b"dog ", b"cat"]))
    assert load_images(DataConfig(path=str(tmp_path / "b.npz"))).labels == ["cat", "dog", "cat"]
    np.savez(tmp_path / "keras.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([3, 4]))
    assert load_images(DataConfig(path=str(tmp_path / "keras.npz"))).labels == ["3", "4"]


def test_a_multi_page_tiff_is_refused_not_read_as_its_first_page(tmp_path):
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (0, 100, 200)]
    (tmp_path / "s").mkdir()
    pages[0].save(tmp_path / "s" / "stack.tif", save_all=True, append_images=pages[1:])
    _gray(tmp_path / "s" / "one.png")
    with pytest.raises(UserError, match=r"stack.tif: it holds 3 pages: save one image per file"):
        load_images(DataConfig(path=str(tmp_path / "s"), on_error="fail"))
    assert len(load_images(DataConfig(path=str(tmp_path / "s")), log=lambda *_: None)) == 1


def test_array_layouts_that_read_two_ways(tmp_path):
    from ddpmkit.data import data_channels

    rgb = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "tiny.npy", rgb)  # 4x4 colour images: H == W, so channels come last
    loaded = load_images(DataConfig(path=str(tmp_path / "tiny.npy"), image_size=4)).images
    assert torch.equal(loaded, torch.from_numpy(rgb).permute(0, 3, 1, 2))
    np.save(tmp_path / "one.npy", rgb[0].repeat(8, 0).repeat(8, 1))  # one 32x32 colour image
    with pytest.raises(UserError, match=r"shape \(32, 32, 3\) reads as 32 gray images 3 pixels "
                                        r"wide, or is one colour image"):
        load_images(DataConfig(path=str(tmp_path / "one.npy")))
    dark_first = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    dark_first[0] /= 200  # the first image alone reads as [0, 1.3]: no scale from it
    np.save(tmp_path / "f.npy", dark_first)
    assert data_channels(DataConfig(path=str(tmp_path / "f.npy"))) == 3


def test_csv_names_match_by_file_name_in_subfolders_and_ambiguity_is_named(tmp_path):
    root = tmp_path / "img"
    for name in ("part1/y.png", "part1/x.png", "part2/x.jpg"):
        _gray(root / name)
    csv_path = tmp_path / "l.csv"

    def read(*names):
        csv_path.write_text("image,label\n" + "".join(f"{n},a\n" for n in names))
        return load_images(DataConfig(path=str(root), labels=str(csv_path)), lambda *_: 0)

    assert read("y.png").files == [str(root / "part1" / "y.png")]
    assert read(str(root / "part1" / "y.png")).files == [str(root / "part1" / "y.png")]
    with pytest.raises(UserError, match=r"'x' could be any of part1/x.png, part2/x.jpg: name "
                                        r"it by its path"):
        read("x")
    with pytest.raises(UserError, match="points outside the data folder"):
        read(str(tmp_path / "l.csv"))
    # a file saved with its accent decomposed (as macOS writes names), named composed in the CSV
    decomposed = unicodedata.normalize("NFD", "caf\u00e9 1.png")
    _gray(root / "part3" / decomposed)
    for name in ("caf\u00e9 1", "part3/caf\u00e9 1.png"):
        assert read(name).files == [str(root / "part3" / decomposed)]


def test_transparent_pixels_are_laid_on_black_and_a_nan_image_is_named(tmp_path):
    """Two images alike in any viewer (a red square on full transparency) are one image to
    training, whatever colour is stored under alpha 0."""
    for name, hidden in (("a.png", 0), ("b.png", 255)):
        px = np.zeros((8, 8, 4), np.uint8)
        px[..., :3] = hidden
        px[2:6, 2:6] = (255, 0, 0, 255)
        (tmp_path / "rgba").mkdir(exist_ok=True)
        Image.fromarray(px, "RGBA").save(tmp_path / "rgba" / name)
    images = load_images(DataConfig(path=str(tmp_path / "rgba"))).images
    assert torch.equal(images[0], images[1]) and images[0, :, 0, 0].tolist() == [0, 0, 0]
    _gray(tmp_path / "f" / "good.png")
    nan = np.array([[np.nan, 1.0], [0.0, 0.5]], np.float32)
    Image.fromarray(nan).save(tmp_path / "f" / "bad.tif")
    with pytest.raises(UserError, match=r"cannot read image .*bad.tif: it holds NaN or infinite"):
        load_images(DataConfig(path=str(tmp_path / "f"), on_error="fail"))


def test_class_counts_and_orders_of_odd_labels(tmp_path):
    """A folder's class count under data.filter_label is training's (1, not every folder's), and
    labels int() refuses sort as names."""
    from ddpmkit.data import class_order, data_class_count

    for name in ("a/1.png", "b/2.png"):
        _gray(tmp_path / name)
    assert data_class_count(DataConfig(path=str(tmp_path), filter_label="a")) == 1
    (tmp_path / "l.csv").write_text("image,label\na/1.png,a\nb/2.png,\n")  # one label left empty
    assert data_class_count(DataConfig(path=str(tmp_path), labels=str(tmp_path / "l.csv"))) == 1
    assert class_order(["10", "2", "--5", "²", "-3"]) == ["-3", "2", "10", "--5", "²"]


def test_upsampling_runs_in_chunks_sized_by_its_output(monkeypatch):
    """Digits of 28x28 up to 1024: chunks sized by the input would hold all 40 at once (640 MB
    of floats), not 64 MB."""
    import ddpmkit.data as data

    sizes = []
    real = data.in_chunks
    monkeypatch.setattr(data, "in_chunks", lambda fn, images, out=0: real(
        lambda part: sizes.append(len(part)) or fn(part), images, out))
    out = resize_center_crop(torch.zeros(40, 1, 28, 28, dtype=torch.uint8), 1024)
    assert out.shape == (40, 1, 1024, 1024) and max(sizes) * 1024 * 1024 <= 2**24


def test_an_array_file_under_the_other_kinds_name_is_refused_in_one_line(tmp_path, capsys):
    # numpy reads a file by its first bytes: an .npy named .npz was read as an array, not an archive
    np.save(tmp_path / "a.npy", np.zeros((4, 8, 8), np.uint8))
    np.savez(tmp_path / "b.npz", images=np.zeros((4, 8, 8), np.uint8))
    shutil.copy(tmp_path / "a.npy", tmp_path / "a_as.npz")
    shutil.copy(tmp_path / "b.npz", tmp_path / "b_as.npy")
    for name, says in (("a_as.npz", "is an .npy array under an .npz name: rename it to a_as.npy"),
                       ("b_as.npy", "is an .npz archive under an .npy name: rename it to "
                                    "b_as.npz")):
        with pytest.raises(UserError, match=says):
            load_images(data_config({"data.path": str(tmp_path / name)}))
        for stream in ("false",) if name.endswith(".npz") else ("false", "true"):  # no .npz
            assert main(["info", f"data.path={tmp_path / name}", f"data.stream={stream}"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and says in err[0], err
    assert len(load_images(data_config({"data.path": str(tmp_path / "a.npy")}))) == 4


def test_images_a_labels_csv_has_no_row_for_are_said_to_be_left_out(tmp_path):
    write_images(tmp_path / "imgs", 4)
    (tmp_path / "l.csv").write_text("image,label\nimg_000.png,a\nimg_001.png,b\n")
    said = []
    data = load_images(DataConfig(path=str(tmp_path / "imgs"), labels=str(tmp_path / "l.csv"),
                                  image_size=8), log=said.append)
    assert len(data) == 2 and data.labels == ["a", "b"]
    assert any("has no row for 2 of the 4 images under" in m and "(e.g. img_002.png): they are "
               "left out" in m for m in said), said


def test_blank_rows_and_unnamed_columns_a_spreadsheet_writes_are_read_past(tmp_path):
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "l.csv").write_text("image,label,,\n,,,\nimg_000.png,a,,\n,,,\nimg_001.png,b,,\n")
    data = load_images(DataConfig(path=str(tmp_path / "imgs"), labels=str(tmp_path / "l.csv"),
                                  image_size=8))
    assert data.labels == ["a", "b"]
