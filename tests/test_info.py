import json

import pytest

from ddpmkit.cli import main
from ddpmkit.config import load_config
from ddpmkit.errors import UserError
from ddpmkit.info import BYTES_PER_PARAMETER, model_info


def test_cifar10_preset_summary_adds_up():
    info = model_info(load_config("configs/cifar10.yaml"), batch_sizes=(1, 2))
    assert info["parameters"] == 35_746_307 == sum(b["parameters"] for b in info["blocks"])
    assert abs(sum(b["gflops"] for b in info["blocks"]) - info["gflops_forward_per_image"]) < 1e-9
    conv_in = info["blocks"][0]
    # multiply-adds of one 3x3 conv, counted as 2 FLOPs
    assert conv_in["gflops"] * 1e9 == 2 * 3 * 128 * 9 * 32 * 32
    assert [b["attention"] for b in info["blocks"]
            if b["block"].startswith("down")] == [False, True, False, False]
    m1, m2 = info["training_memory_mib_by_batch"]["1"], info["training_memory_mib_by_batch"]["2"]
    weights = 35_746_307 * BYTES_PER_PARAMETER / 2**20
    assert abs((m2 - weights) - 2 * (m1 - weights)) < 0.2  # activations scale with the batch


def test_every_parameter_is_in_a_block_with_classes_and_augmentation():
    cfg = load_config(None, {"model.class_conditional": True, "model.num_classes": 2,
                             "train.augment": ["hflip"], "train.augment_p": 0.5})
    info = model_info(cfg, batch_sizes=(1,))
    assert info["blocks"][1]["block"] == "embeddings"
    assert info["parameters"] == sum(b["parameters"] for b in info["blocks"])


def test_info_command_on_a_run_and_on_overrides(tmp_path, capsys):
    from test_cli import TINY_ARGS

    run = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--steps", "2", "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["channels"] == 1 and info["image_size"] == 8
    assert main(["info", "model.preset=ddpm-cifar10", "data.image_size=32", "data.channels=3"]) == 0
    assert "35,746,307 parameters" in capsys.readouterr().out
    # a fine-tuning config is sized as its source, not
    # as its own (default) preset; so is --max-batch
    assert main(["info", f"train.init_from={run}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == info["parameters"] != 917_889
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert f"no run or config at {tmp_path / 'nope'}" in capsys.readouterr().err


def _idx(path, images):
    """An MNIST-style IDX image file (uint8, N x H x W)."""
    import struct

    path.write_bytes(struct.pack(">BBBB3I", 0, 0, 0x08, 3, *images.shape) + images.tobytes())
    return path


def test_info_sizes_the_model_for_the_channels_of_the_data_it_names(tmp_path, capsys):
    """A config naming grayscale data used to be sized for 3 channels: the data's channels are read
    (image headers, the first image of a .npy), and 3 is assumed, and said, only for a missing
    path."""
    import numpy as np
    from conftest import write_images

    rng = np.random.default_rng(0)
    write_images(tmp_path / "gray", 3, mode="L")
    write_images(tmp_path / "rgb", 3, mode="RGB")
    (tmp_path / "labels.csv").write_text("image,label\nimg_000,a\nimg_002,b\n")
    np.save(tmp_path / "gray.npy", rng.integers(0, 256, (4, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "rgb.npy", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    (tmp_path / "mnist").mkdir()
    _idx(tmp_path / "mnist" / "train-images-idx3-ubyte",
         rng.integers(0, 256, (4, 8, 8), dtype=np.uint8))

    def info(*overrides):
        assert main(["info", *overrides, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    for data, channels in (("gray", 1), ("rgb", 3), ("gray.npy", 1), ("rgb.npy", 3), ("mnist", 1),
                           ("mnist/train-images-idx3-ubyte", 1)):
        out = info(f"data.path={tmp_path / data}")
        assert (out["channels"] == channels
                and out["channels_from"] == f"the data in {tmp_path / data}"), data
    assert info(f"data.path={tmp_path / 'gray'}",
                f"data.labels={tmp_path / 'labels.csv'}")["channels"] == 1
    out = info(f"data.path={tmp_path / 'gray'}", "data.channels=3")
    assert (out["channels"], out["channels_from"]) == (3, "data.channels")
    out = info(f"data.path={tmp_path / 'rgb'}", "model.in_channels=1")
    assert (out["channels"], out["channels_from"]) == (1, "model.in_channels")
    one = load_config(None, {"data.path": str(tmp_path / "gray")})
    # the default model with 1 input channel, as training builds it
    assert model_info(one)["parameters"] == 917_889
    # a path that is not there (yet): RGB assumed, and said
    assert main(["info", f"data.path={tmp_path / 'later'}"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"3 channels assumed: data.path {tmp_path / 'later'} does not exist here " \
                   f"(set data.channels=1 for grayscale data)"


def test_info_counts_the_classes_a_class_conditional_model_will_embed(tmp_path):
    from conftest import write_images

    write_images(tmp_path / "imgs", 3, mode="L")
    (tmp_path / "labels.csv").write_text("image,label\nimg_000,a\nimg_001,b\nimg_002,b\n")
    csv_data = {"data.path": str(tmp_path / "imgs"), "data.labels": str(tmp_path / "labels.csv"),
                "model.class_conditional": True}
    for data, classes in ((csv_data, 2), ({"model.class_conditional": True}, 10)):  # the digits
        found = model_info(load_config(None, data), batch_sizes=(1,))["parameters"]
        told = model_info(load_config(None, {**data, "model.num_classes": classes}),
                          batch_sizes=(1,))["parameters"]
        assert found == told > model_info(load_config(None, {**data, "model.num_classes": 1}),
                                          batch_sizes=(1,))["parameters"]
    with pytest.raises(UserError, match="model.class_conditional=true needs labels"):
        model_info(load_config(None, {"data.path": str(tmp_path / "imgs"),
                                      "model.class_conditional": True}), batch_sizes=(1,))
