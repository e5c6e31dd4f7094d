"""The learning rate: linear warmup lr * min(1, (s + 1) / max(1, warmup_steps)) at step s (README,
train.warmup_steps), read from the optimizer at each step and measured in the weights it moves:
with a constant gradient every AdamW step moves each weight by exactly its learning rate."""

from __future__ import annotations

import json

import pytest
import torch

from ddpmkit import training
from ddpmkit.training import train

LR = 2e-3


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # as test_restoration.py: small tensors, no thread hand-offs


def quiet(*_):
    pass


def documented_lr(step: int, warmup: int) -> float:
    return LR * min(1.0, (step + 1) / max(1, warmup))


def constant_gradient_loss(net, schedule, prediction, x0, t, noise, **_):
    """sum of all weights: gradient 1 everywhere, so AdamW's bias-corrected step is
    lr * m / (sqrt(v) + eps) = lr / (1 + 1e-8) for every weight at every step (weight decay 0)."""
    return sum(p.sum() for p in net.parameters())


def _train_and_measure(tiny, monkeypatch, warmup, steps):
    """(learning rate in the optimizer, mean weight change) of each step of a real run."""
    lrs, moves = [], []
    real_step = training._optimizer_step

    def measured(job, state, loss):
        before = [p.detach().clone() for p in state.model.parameters()]
        finite = real_step(job, state, loss)
        lrs.append(state.opt.param_groups[0]["lr"])
        moves.append(torch.cat([(b - p.detach()).flatten().double()
                                for b, p in zip(before, state.model.parameters())]))
        return finite

    monkeypatch.setattr(training, "diffusion_loss", constant_gradient_loss)
    monkeypatch.setattr(training, "_optimizer_step", measured)
    monkeypatch.setattr(training, "_grid", lambda *a: None)
    run = train(tiny(**{"train.max_steps": steps, "train.warmup_steps": warmup, "train.lr": LR,
                        "train.grad_clip": 0.0, "train.log_every": 5,
                        "train.checkpoint_every": steps}), log=quiet, progress=False)
    logged = [json.loads(line) for line in (run.path / "stats.jsonl").read_text().splitlines()]
    return lrs, moves, {r["step"]: r["lr"] for r in logged if "lr" in r}


@pytest.mark.parametrize("warmup,expected", [
    # step 0 takes a tenth, mid-warmup (s = 4) half, from s = 9 on the full rate
    (10, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.0, 1.0]),
    (0, [1.0] * 12),  # no warmup: the full rate from step 0 (max(1, 0) = 1)
    (1, [1.0] * 12),
])
def test_learning_rate_of_each_step_is_the_linear_warmup(tiny, monkeypatch, warmup, expected):
    lrs, moves, logged = _train_and_measure(tiny, monkeypatch, warmup, 12)
    assert [documented_lr(s, warmup) / LR for s in range(12)] == pytest.approx(expected)
    assert lrs == pytest.approx([LR * e for e in expected], rel=1e-12)
    # what the optimizer actually did: every weight moved by that step's rate
    for s, move in enumerate(moves):
        assert move.min().item() == pytest.approx(LR * expected[s], rel=1e-3), s
        assert move.max().item() == pytest.approx(LR * expected[s], rel=1e-3), s
    # stats.jsonl logs the rate of the last step of each window: steps 5 and 10 of 12, and 12
    assert logged == pytest.approx({5: LR * expected[4], 10: LR * expected[9],
                                    12: LR * expected[11]}, rel=1e-12)
