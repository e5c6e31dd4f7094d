"""Label dropout for classifier-free guidance: each label of each step is replaced by the null
label -1 with probability train.label_dropout, independently, and -1 is the label the sampler's
unconditional branch passes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ddpmkit.distributed import World
from ddpmkit.samplers import Denoiser
from ddpmkit.schedule import Schedule
from ddpmkit.training import _draw
from ddpmkit.unet import UNet

CLASSES, BATCH, STEPS = 4, 32, 500


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _training_labels(tiny, p, steps=STEPS):
    """(class ids, labels the loss was given) of `steps` training steps, as (steps, BATCH)."""
    cfg = tiny(**{"train.label_dropout": p, "train.batch_size": BATCH, "data.image_size": 8,
                  "model.in_channels": 1})
    job = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), world=World(),
                          rows=slice(0, BATCH))
    class_ids = torch.arange(BATCH) % CLASSES
    batch = lambda step: (torch.zeros(BATCH, 1, 8, 8, dtype=torch.uint8), class_ids)  # noqa: E731
    schedule = Schedule.from_config(cfg.diffusion)
    labels = torch.stack([_draw(job, schedule, s, batch).labels for s in range(steps)])
    return class_ids.expand(steps, BATCH), labels


@pytest.mark.parametrize("p", [0.1, 0.3, 0.75])
def test_the_share_of_dropped_labels_is_label_dropout(tiny, p):
    """Over 500 steps of 32 labels, the dropped count is Binomial(16000, p): within 4.5 standard
    deviations of 16000 p overall and for each class (Binomial(4000, p)); per step it is
    Binomial(32, p), whose variance 32 p (1 - p) the 500 per-step counts reproduce (dropping whole
    batches at once would give 32 times that)."""
    class_ids, labels = _training_labels(tiny, p)
    dropped = labels == -1
    assert torch.equal(labels[~dropped], class_ids[~dropped])  # the others are kept as they are
    n = dropped.numel()
    assert abs(dropped.sum().item() - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))
    for c in range(CLASSES):
        mine = dropped[class_ids == c]
        m = mine.numel()
        assert abs(mine.sum().item() - m * p) <= 4.5 * math.sqrt(m * p * (1 - p)), c
    per_step = dropped.sum(1).double()
    assert per_step.var().item() / (BATCH * p * (1 - p)) == pytest.approx(1.0, abs=0.3)


@pytest.mark.parametrize("p,share", [(0.0, 0.0), (1.0, 1.0)])
def test_label_dropout_zero_keeps_every_label_and_one_drops_every_label(tiny, p, share):
    _, labels = _training_labels(tiny, p, steps=20)
    assert (labels == -1).double().mean().item() == share


def test_the_dropped_label_is_the_one_the_sampler_gives_the_unconditional_branch(tiny):
    """The null label training writes is the one Denoiser passes for the unconditional half of
    guidance, and the network's output on it is its output without a class."""
    class_ids, labels = _training_labels(tiny, 0.3, steps=10)
    null = set(labels[labels != class_ids].tolist())
    assert null == {-1}
    cfg = tiny(**{"model.in_channels": 1, "model.num_classes": CLASSES,
                  "model.class_conditional": True})
    torch.manual_seed(0)
    net = UNet(cfg.model, 8).eval()
    torch.nn.init.normal_(net.class_embedding.weight)
    seen = []
    hook = net.register_forward_pre_hook(lambda _, args: seen.append(args[2].clone()))
    schedule = Schedule.from_config(cfg.diffusion)
    x, asked = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 3])
    Denoiser(net, schedule, "eps", clip_x0=False, labels=asked, guidance=3.0)(x, 40.0)
    Denoiser(net, schedule, "eps", clip_x0=False, labels=asked, guidance=0.0)(x, 40.0)
    hook.remove()
    (both,), (unconditional,) = seen[:1], seen[1:]
    assert torch.equal(both[:3], asked) and set(both[3:].tolist()) == null
    assert set(unconditional.tolist()) == null
    t = torch.full((3,), 40.0)
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.full((3,), null.pop())), net(x, t))
