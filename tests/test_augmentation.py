"""Non-leaky augmentation: the operations' known answers, the label the network is told, and a run
that trains on flipped images yet samples unflipped ones."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from ddpmkit import augmentation
from ddpmkit.checkpoint import read_checkpoint
from ddpmkit.diffusers_format import ddpmkit_to_diffusers_state_dict
from ddpmkit.errors import UserError
from ddpmkit.generation import sample
from ddpmkit.run import RunDir, load_run
from ddpmkit.training import train
from ddpmkit.unet import UNet

QUIET = {"log": lambda *_: None, "progress": False}


def _ramp(n: int = 2, size: int = 8) -> torch.Tensor:
    return torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size)


def _aug(n=2, hflip=(), vflip=(), rot90=(), shift=None, ops=("hflip", "vflip", "rot90",
                                                              "translate")):
    flag = lambda rows: torch.tensor([i in rows for i in range(n)])  # noqa: E731
    rot = torch.zeros(n, dtype=torch.long)
    for i, k in rot90:
        rot[i] = k
    return augmentation.Augmentation(flag(hflip), flag(vflip), rot,
                                     torch.tensor(shift or [[0, 0]] * n), ops)


def test_each_operation_does_what_it_says_to_the_chosen_images_only():
    x = _ramp()
    assert torch.equal(augmentation.apply(x, _aug(hflip=[0])), torch.stack([x[0].flip(-1), x[1]]))
    assert torch.equal(augmentation.apply(x, _aug(vflip=[1])), torch.stack([x[0], x[1].flip(-2)]))
    turned = augmentation.apply(x, _aug(rot90=[(0, 3)]))
    assert torch.equal(turned[0], x[0].rot90(3, (-2, -1))) and torch.equal(turned[1], x[1])
    moved = augmentation.apply(x, _aug(shift=[[1, -1], [0, 0]]))  # right 1, up 1
    assert torch.equal(moved[0, :, :-1, 1:], x[0, :, 1:, :-1]) and torch.equal(moved[1], x[1])
    assert torch.equal(moved[0, :, :-1, 0], x[0, :, 1:, 1])  # the edge reflected, not wrapped


def test_the_label_says_what_was_done_and_is_zero_for_nothing():
    aug = _aug(hflip=[0], rot90=[(1, 2)], shift=[[0, 0], [2, -1]])
    labels = aug.labels(8)
    assert labels.shape == (2, augmentation.label_dim(list(aug.ops))) == (2, 7)
    assert labels[0].tolist() == [1, 0, 0, 0, 0, 0, 0]
    assert labels[1].tolist() == [0, 0, 0, 1, 0, 0.25, -0.125]
    assert not _aug().labels(8).any()


def test_draw_applies_each_operation_at_its_probability_and_only_those_asked():
    g = torch.Generator().manual_seed(0)
    aug = augmentation.draw(("hflip", "translate"), 0.3, 20_000, 32, g, torch.device("cpu"))
    assert abs(aug.hflip.float().mean() - 0.3) < 0.02
    assert abs(aug.shift.any(1).float().mean() - 0.3 * (1 - 1 / 81)) < 0.02  # (0, 0) can be drawn
    assert aug.shift.abs().max() == 4 and not aug.vflip.any() and not aug.rot90.any()


def test_no_label_is_the_same_as_nothing_done(tiny, tmp_path):
    cfg = tiny(**{"model.augment_dim": 7, "model.in_channels": 1}).model
    net = UNet(cfg, 8).eval()
    torch.nn.init.normal_(net.augment_embedding.weight)  # trained: not zero any more
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 50, 99])
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, augment=torch.zeros(3, 7)))
        assert not torch.allclose(net(x, t), net(x, t, augment=torch.ones(3, 7)))


@pytest.mark.parametrize("overrides, says", [
    ({"train.augment": ["mirror"], "train.augment_p": 0.5}, "train.augment"),
    ({"train.augment": ["hflip", "hflip"], "train.augment_p": 0.5}, "train.augment"),
    ({"train.augment": ["hflip"]}, "augment_p"),
    ({"train.augment_p": 0.5}, "augment_p"),
])
def test_bad_augmentation_keys_are_refused(tmp_path, overrides, says):
    with pytest.raises(UserError, match=says):
        tiny_config(tmp_path, **overrides)


def test_augmenting_every_image_is_refused_by_training_not_by_a_trained_runs_readers(tmp_path):
    """At p = 1 the network never sees the 'none' label sampling gives it. Refused before training;
    a run's config that holds it still loads (to sample, evaluate or report on it)."""
    cfg = tiny_config(tmp_path, **{"train.augment": ["translate"], "train.augment_p": 1})
    with pytest.raises(UserError, match="augment_p=1: every training image would be augmented"):
        train(cfg, log=lambda *_: None, progress=False)
    assert not (tmp_path / "run").exists() or not RunDir(tmp_path / "run").is_run()


def _half_bright(folder, n=96):
    """Images bright on the left half, dark on the right, with a little noise."""
    rng = np.random.default_rng(0)
    x = np.full((n, 8, 8), 40.0)
    x[:, :, :4] = 215
    x += rng.normal(0, 8, x.shape)
    path = folder / "left.npy"
    np.save(path, x.clip(0, 255).astype(np.uint8))
    return path


def test_a_run_trained_on_mirrored_images_samples_unmirrored_ones(tmp_path):
    """Half the training images are mirrored (bright on the right); told so, the network learns
    that 'not mirrored' means bright on the left, and that is what sampling asks for."""
    cfg = tiny_config(tmp_path, **{"data.path": str(_half_bright(tmp_path)), "data.image_size": 8,
                                   "train.augment": ["hflip"], "train.augment_p": 0.5,
                                   "train.max_steps": 1000, "train.checkpoint_every": 1000,
                                   "train.lr": 3e-3})
    run = train(cfg, **QUIET)
    x = sample(load_run(run.path), num=64, seed=1, steps=20).float()
    left, right = x[..., :4].mean((1, 2, 3)), x[..., 4:].mean((1, 2, 3))
    assert (left > right).float().mean() >= 0.9
    # asked for mirrored images, it makes them: the flips were applied with their labels (a run
    # that never flipped would make bright-left images whatever the label said)
    class Mirrored(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, *rest):
            return self.net(x, t, *rest, augment=torch.ones(len(x), 1))

    mirrored = load_run(run.path)
    mirrored.net = Mirrored(mirrored.net)
    x = sample(mirrored, num=64, seed=1, steps=20).float()
    assert (x[..., 4:].mean((1, 2, 3)) > x[..., :4].mean((1, 2, 3))).float().mean() >= 0.9
    groups, _ = read_checkpoint(run.checkpoint_file(1000), prefixes=("ema",))
    assert groups["ema"]["augment_embedding.weight"].abs().sum() > 0  # it learned from the label
    # the exported network is the sampling one: the training-only embedding is left out
    exported = ddpmkit_to_diffusers_state_dict(groups["ema"], RunDir(run.path).config())
    assert not [k for k in exported if "augment" in k]


def test_an_augmented_run_resumes_exactly(tmp_path):
    overrides = {"train.augment": ["hflip", "rot90", "translate"], "train.augment_p": 0.4,
                 "train.max_steps": 20}
    whole = train(tiny_config(tmp_path / "a", **overrides), **QUIET)
    train(tiny_config(tmp_path / "b", **{**overrides, "train.max_steps": 10}), **QUIET)
    resumed = train(tiny_config(tmp_path / "b", **overrides), **QUIET)
    a, _ = read_checkpoint(whole.checkpoint_file(20), prefixes=("model",))
    b, _ = read_checkpoint(resumed.checkpoint_file(20), prefixes=("model",))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_audit_every_logs_the_copy_rate_and_the_report_plots_it(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.max_steps": 20, "train.audit_every": 10,
                                   "train.audit_num": 16})
    run = train(cfg, **QUIET)
    audits = [r for r in map(json.loads, run.stats_path.read_text().splitlines()) if "audit" in r]
    assert [r["step"] for r in audits] == [10, 20]
    for r in audits:
        assert r["audit"]["generated"] == 16 and 0 <= r["audit"]["copy_rate"] <= 1
        assert 0 < r["audit"]["threshold"] < r["audit"]["median_distance"]
    assert "near-copies of training images" in (run.path / "report.html").read_text()


def test_audit_every_is_refused_for_streamed_data_before_anything_is_written(tmp_path):
    path = _half_bright(tmp_path)
    cfg = tiny_config(tmp_path, **{"data.path": str(path), "data.stream": True,
                                   "train.audit_every": 10, "train.max_steps": 10})
    with pytest.raises(UserError, match="audit_every"):
        train(cfg, **QUIET)
    assert not (tmp_path / "run").exists()
    # too few images for its leave-one-out threshold: the advice is one train can follow
    few = tmp_path / "few.npy"
    np.save(few, np.load(path)[:15])
    cfg = tiny_config(tmp_path, **{"data.path": str(few), "train.audit_every": 10})
    with pytest.raises(UserError, match=r"and 15 are fewer than 20: set train.audit_every=0 and "
                                        r"audit samples afterwards against held-out images"):
        train(cfg, **QUIET)
    assert not (tmp_path / "run").exists()


def test_fine_tuning_a_run_without_augmentation_adds_a_new_embedding(tmp_path):
    source = train(tiny_config(tmp_path / "source", **{"train.max_steps": 10}), **QUIET)
    said = []
    tuned = train(tiny_config(tmp_path / "tuned", **{
        "train.init_from": str(source.path), "train.augment": ["vflip"], "train.augment_p": 0.5,
        "train.max_steps": 10}), log=said.append, progress=False)
    assert any("augmentation embedding new" in m for m in said)
    groups, _ = read_checkpoint(tuned.checkpoint_file(10), prefixes=("model",))
    assert groups["model"]["augment_embedding.weight"].shape[1] == 1
    # another operation of the same label size: the embedding's column meant vflip, so it is new
    said.clear()
    train(tiny_config(tmp_path / "again", **{
        "train.init_from": str(tuned.path), "train.augment": ["hflip"], "train.augment_p": 0.5,
        "train.max_steps": 1}), log=said.append, progress=False)
    assert ("init_from: augmentation embedding new (train.augment [hflip], the source's "
            "[vflip])" in said)


def test_audits_and_evaluations_between_checkpoints_are_made_at_their_own_steps(tmp_path):
    cfg = tiny_config(tmp_path, **{"train.max_steps": 12, "train.audit_every": 4,
                                   "train.audit_num": 8, "train.checkpoint_every": 10})
    run = train(cfg, **QUIET)
    audits = [r["step"] for r in map(json.loads, run.stats_path.read_text().splitlines())
              if "audit" in r]
    assert audits == [4, 8, 12]  # checkpoints saved at 4 and 8 for them, besides 10 and 12
