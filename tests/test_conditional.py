"""Class-conditional models: labels, label dropout, classifier-free guidance, --class."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddpmkit.cli import main
from ddpmkit.config import load_config
from ddpmkit.data import load_images
from ddpmkit.errors import UserError
from ddpmkit.generation import sample
from ddpmkit.run import load_run
from ddpmkit.samplers import Denoiser
from ddpmkit.schedule import Schedule
from ddpmkit.training import train
from ddpmkit.unet import UNet
from conftest import write_images


def quiet(*_):
    pass


def test_guidance_zero_is_the_unconditional_model_and_one_the_conditional(tiny):
    cfg = tiny(**{"model.in_channels": 1, "model.num_classes": 4,
                  "model.class_conditional": True})
    torch.manual_seed(0)
    net = UNet(cfg.model, 8).eval()
    torch.nn.init.normal_(net.class_embedding.weight)  # make the classes matter
    schedule = Schedule.from_config(cfg.diffusion)
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 3])
    t = torch.full((3,), 40.0)

    def run(guidance):
        return Denoiser(net, schedule, "eps", clip_x0=False, labels=labels,
                        guidance=guidance)(x, 40.0)[1]

    with torch.no_grad():
        uncond, cond = net(x, t), net(x, t, labels)
        assert torch.equal(net(x, t, torch.full((3,), -1)), uncond)  # label -1 = no class
    assert (torch.allclose(run(0.0), uncond, atol=1e-5)
            and torch.allclose(run(1.0), cond, atol=1e-5))
    assert not torch.allclose(cond, uncond, atol=1e-3)
    assert torch.allclose(run(3.0), uncond + 3.0 * (cond - uncond), atol=1e-4)


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A small class-conditional model of the digits."""
    out = tmp_path_factory.mktemp("cond") / "run"
    cfg = load_config(None, {"model.class_conditional": True, "model.base_channels": 32,
                             "model.num_res_blocks": 1, "train.max_steps": 400, "train.lr": 2e-3,
                             "train.batch_size": 64,
                             "train.log_every": 100, "train.sample_every": 10**6,
                             "train.checkpoint_every": 400, "train.out_dir": str(out)})
    train(cfg, log=quiet, progress=False)
    return out


def _judge():
    """Logistic regression on the real 8x8 digits: ~96% accurate on held-out real digits."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=2000).fit(digits.data / 16.0, digits.target)


def test_conditional_samples_show_the_requested_class(conditional_run):
    run = load_run(conditional_run)
    assert (run.config.data.class_names == [str(i) for i in range(10)]
            and run.config.model.num_classes == 10)
    judge = _judge()

    def accuracy(guidance, digit):
        # guidance 0 with a class is refused: the unconditional model ignores it
        images = sample(run, num=40, seed=1, sampler="ddim", steps=20,
                        class_label=str(digit) if guidance else None, guidance=guidance)
        return (judge.predict(images.reshape(40, 64).numpy() / 255.0) == digit).mean()

    guided = np.mean([accuracy(3.0, d) for d in (0, 3, 7)])
    unguided = np.mean([accuracy(0.0, d) for d in (0, 3, 7)])
    assert guided > 0.8  # the requested digit
    assert unguided < 0.35  # guidance 0 ignores the class: about one in ten


def test_a_run_that_never_dropped_labels_is_sampled_without_guidance_only(tiny):
    run = train(tiny(**{"model.class_conditional": True, "train.label_dropout": 0.0,
                        "train.max_steps": 2}), log=quiet, progress=False)
    run = load_run(run.path)
    with pytest.raises(UserError, match="trained with train.label_dropout=0, so it never learnt"):
        sample(run, num=2, steps=2, guidance=2.0)
    assert sample(run, num=2, steps=2).shape[0] == 2
    with pytest.raises(UserError, match=r"--class banana: not a class of the data \(0, 1, .*; "
                                        r"config key sample.class_label"):
        train(tiny(**{"model.class_conditional": True, "sample.class_label": "banana"}),
              log=quiet, progress=False)


def test_label_dropout_one_leaves_the_class_embedding_untrained(tiny):
    run = train(tiny(**{"model.class_conditional": True, "train.label_dropout": 1.0,
                        "train.max_steps": 10, "train.checkpoint_every": 5}),
                log=quiet, progress=False)
    early, late = load_file(run.checkpoint_file(5)), load_file(run.checkpoint_file(10))
    assert torch.equal(early["model/class_embedding.weight"],
                       late["model/class_embedding.weight"])  # never used
    assert not torch.equal(early["model/conv_in.weight"],
                           late["model/conv_in.weight"])  # the rest trained


def test_labels_from_class_subfolders_csv_and_npz(tmp_path, tiny):
    for name in ("cat", "dog"):
        write_images(tmp_path / "pets" / name, n=3, size=(8, 8))
    data = load_images(tiny(**{"data.path": str(tmp_path / "pets")}).data)
    assert sorted(set(data.labels)) == ["cat", "dog"] and data.labels.count("cat") == 3
    np.savez(tmp_path / "m.npz", train_images=np.zeros((4, 8, 8), np.uint8),
             train_labels=np.array([[2], [10], [2], [1]]))
    run = train(tiny(**{"data.path": str(tmp_path / "m.npz"), "model.class_conditional": True,
                        "train.max_steps": 2}),
                log=quiet, progress=False)
    # numbers in numeric order
    assert load_run(run.path).config.data.class_names == ["1", "2", "10"]
    with pytest.raises(UserError, match="needs labels"):
        np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
        train(tiny(**{"data.path": str(tmp_path / "x.npy"), "model.class_conditional": True,
                      "train.out_dir": str(tmp_path / "nolabels")}), log=quiet, progress=False)
    write_images(tmp_path / "pets", n=1, size=(8, 8))  # one image beside the class folders
    with pytest.raises(UserError, match=r"pets/img_000\.png is not in a class subfolder"):
        train(tiny(**{"data.path": str(tmp_path / "pets"), "model.class_conditional": True,
                      "train.out_dir": str(tmp_path / "stray")}), log=quiet, progress=False)
    csv = tmp_path / "files.csv"  # selects images, but its class column has another name
    csv.write_text("image,diagnosis\nimg_000.png,cat\n")
    with pytest.raises(UserError, match=r"files\.csv has no column 'label': set data\.label_col"
                       r".* \(columns: image, diagnosis\)"):
        train(tiny(**{"data.path": str(tmp_path / "pets"), "data.labels": str(csv),
                      "model.class_conditional": True, "train.out_dir": str(tmp_path / "csv")}),
              log=quiet, progress=False)


def test_sample_command_class_and_manifest(conditional_run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(conditional_run), "-n", "6", "--class", "4", "--guidance", "2",
                 "--steps", "5", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert [r["label"] for r in rows] == ["4"] * 6 and all(r["synthetic"] == "true" for r in rows)
    assert main(["sample", str(conditional_run), "-n", "12", "--steps", "5",
                 "--out", str(tmp_path / "all"), "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "all" / "manifest.csv")))
    assert [r["label"] for r in rows] == [str(k % 10) for k in range(12)]  # classes in turn
    assert main(["sample", str(conditional_run), "-n", "2", "--class", "cat",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--class cat: not a class of" in capsys.readouterr().err
    # guidance 0 is the unconditional model: its images carry no class, and asking for one is
    # refused
    assert main(["sample", str(conditional_run), "-n", "3", "--guidance", "0", "--steps", "2",
                 "--out", str(tmp_path / "u"), "--quiet"]) == 0
    assert ([r["label"] for r in csv.DictReader(open(tmp_path / "u" / "manifest.csv"))]
            == ["", "", ""])
    assert main(["sample", str(conditional_run), "-n", "2", "--class", "4", "--guidance", "0",
                 "--out", str(tmp_path / "x")]) == 2
    assert ("--class 4 with sample.guidance=0: guidance 0 samples the unconditional model"
            in capsys.readouterr().err)
    assert main(["balance", str(conditional_run), "--out", str(tmp_path / "b"),
                 "--guidance", "0"]) == 2
    assert ("balance with sample.guidance=0 would label unconditional samples"
            in capsys.readouterr().err)
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_training_names_each_class_with_its_count_and_warns_of_names_alike_but_for_case(
        tiny, tmp_path):
    for name, n in (("Melanoma", 3), ("melanoma", 2), ("nevus", 5)):
        write_images(tmp_path / "skin" / name, n=n, size=(8, 8), seed=n)
    said = []
    train(tiny(**{"data.path": str(tmp_path / "skin"), "model.class_conditional": True,
                  "train.max_steps": 1}), log=said.append, progress=False)
    assert "classes: Melanoma 3, melanoma 2, nevus 5" in said
    assert any(m.startswith("warning: labels Melanoma, melanoma differ only in case") for m in said)
