import json

from ddpmkit.cli import main
from ddpmkit.config import load_config
from ddpmkit.info import BYTES_PER_PARAMETER, model_info


def test_cifar10_preset_summary_adds_up():
    info = model_info(load_config("configs/cifar10.yaml"), batch_sizes=(1, 2))
    assert info["parameters"] == 35_746_307 == sum(b["parameters"] for b in info["blocks"])
    assert abs(sum(b["gflops"] for b in info["blocks"]) - info["gflops_forward_per_image"]) < 1e-9
    conv_in = info["blocks"][0]
    assert conv_in["gflops"] * 1e9 == 2 * 3 * 128 * 9 * 32 * 32  # multiply-adds of one 3x3 conv, counted as 2 FLOPs
    assert [b["attention"] for b in info["blocks"] if b["block"].startswith("down")] == [False, True, False, False]
    m1, m2 = info["training_memory_mib_by_batch"]["1"], info["training_memory_mib_by_batch"]["2"]
    weights = 35_746_307 * BYTES_PER_PARAMETER / 2**20
    assert abs((m2 - weights) - 2 * (m1 - weights)) < 0.2  # activations scale with the batch


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
    # a fine-tuning config is sized as its source, not as its own (default) preset; so is --max-batch
    assert main(["info", f"train.init_from={run}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == info["parameters"] != 917_889
