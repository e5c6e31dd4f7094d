"""The training loop's rates, against their formulas. The EMA's warmup, min(decay, (1 + s) /
(10 + s)) at step s (train.ema_decay), one update at a time and, through the loop, as the closed
form after k updates of weights set by hand. The learning rate's linear warmup, lr * min(1,
(s + 1) / max(1, warmup_steps)) (train.warmup_steps), read from the optimizer and measured in the
weights it moves: with a constant gradient every AdamW step moves each weight by its rate."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ddpmkit import training
from ddpmkit.training import TrainState, _update_ema, train


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # as test_restoration.py: small tensors, no thread hand-offs


def quiet(*_):
    pass


def documented_decay(ema_decay: float, step: int) -> float:
    return min(ema_decay, (1 + step) / (10 + step))


@pytest.mark.parametrize("step,decay", [
    (0, 1 / 10),  # the first update keeps a tenth of the initial weights
    (1, 2 / 11),
    (5, 6 / 15),
    (100, 101 / 110),
    (1789, 1790 / 1799),  # just below 0.995: (1 + s) / (10 + s) crosses it at s = 1790
    (1791, 0.995),  # from there on the configured decay
    (10**6, 0.995),
])
def test_one_update_uses_the_warmed_up_decay_of_its_step(step, decay):
    """ema 0, weights 1: one update leaves ema = 1 - decay, the decay of step s exactly."""
    assert documented_decay(0.995, step) == pytest.approx(decay, rel=1e-12)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    for p, q in zip(model.parameters(), ema.parameters()):
        p.data.fill_(1.0), q.data.fill_(0.0)
    state = TrainState(model, ema, opt=None, scaler=None, schedule=None, step=step)
    _update_ema(state, 0.995, torch.tensor(1.0))
    for q in ema.parameters():
        torch.testing.assert_close(q, torch.full_like(q, 1.0 - decay), rtol=1e-6, atol=0)
    _update_ema(state, 0.995, torch.tensor(0.0))  # a skipped (non-finite) step changes nothing
    for q in ema.parameters():
        torch.testing.assert_close(q, torch.full_like(q, 1.0 - decay), rtol=1e-6, atol=0)


def theta(step: int) -> float:
    """The weights the test sets after the optimizer step of step s: s / 8 (exact in float32)."""
    return step / 8


E0 = -1.0  # the EMA's starting weights, set by hand before the first update


def closed_form_ema(k: int) -> float:
    """EMA after k updates of weights theta(s) from E0, while (1 + s) / (10 + s) is below the
    configured decay. The decays telescope: prod_{s<k} (1 + s) / (10 + s) = 1 / C(k + 9, 9), and
    weight s's share (1 - d_s) prod_{s<j<k} d_j is C(s + 9, 8) / C(k + 9, 9), so
    ema_k = (E0 + sum_{s<k} C(s + 9, 8) theta(s)) / C(k + 9, 9)."""
    return (E0 + sum(math.comb(s + 9, 8) * theta(s) for s in range(k))) / math.comb(k + 9, 9)


def recurrence_ema(k: int, ema_decay: float) -> float:
    e = E0
    for s in range(k):
        d = documented_decay(ema_decay, s)
        e = d * e + (1 - d) * theta(s)
    return e


def cheap_loss(net, schedule, prediction, x0, t, noise, **_):
    """Stands in for the diffusion loss, which the EMA does not depend on: no UNet pass (a second
    a step on 2 CPU cores)."""
    return sum(p.sum() for p in net.parameters())


def _train_with_hand_set_weights(tiny, k, ema_decay, monkeypatch):
    """Train k steps where each optimizer step is replaced by setting every weight to theta(step)
    (and, before the first EMA update, every EMA weight to E0); returns the saved EMA weights."""
    monkeypatch.setattr(training, "diffusion_loss", cheap_loss)
    def set_weights(job, state, loss):
        with torch.no_grad():
            if state.step == 0:
                for q in state.ema.parameters():
                    q.fill_(E0)
            for p in state.model.parameters():
                p.fill_(theta(state.step))
        return torch.ones((), device=job.device)

    monkeypatch.setattr(training, "_optimizer_step", set_weights)
    monkeypatch.setattr(training, "_grid", lambda *a: None)  # weights like these draw no images
    run = train(tiny(**{"train.max_steps": k, "train.checkpoint_every": k,
                        "train.ema_decay": ema_decay}), log=quiet, progress=False)
    saved = load_file(run.checkpoint_file(k))
    model = {n: t for n, t in saved.items() if n.startswith("model/")}
    ema = {n: t for n, t in saved.items() if n.startswith("ema/")}
    assert model and all(torch.all(t == theta(k - 1)) for t in model.values())
    return torch.cat([t.flatten() for t in ema.values()]).double()


def test_ema_after_k_training_steps_is_the_closed_form(tiny, monkeypatch):
    """train.ema_decay 0.995: 20 steps are all in warmup (below the crossover at s = 1790), so the
    saved EMA is the polynomial-weighted mean of the closed form, 12161077 / 5722860 = 2.12499991
    for every weight. The ramp taken at s + 1 instead gives 2.11249940, no warmup -0.7893."""
    k = 20
    expected = closed_form_ema(k)
    assert expected == pytest.approx(recurrence_ema(k, 0.995), rel=1e-12)
    assert expected == pytest.approx(12161077 / 5722860, rel=1e-12)
    ema = _train_with_hand_set_weights(tiny, k, 0.995, monkeypatch)
    torch.testing.assert_close(ema, torch.full_like(ema, expected), rtol=0, atol=2e-6)


def test_ema_after_warmup_uses_the_configured_decay(tiny, monkeypatch):
    """train.ema_decay 0.5: the warmup ramp reaches 0.5 at s = 8, so steps 0-7 follow the ramp and
    8-9 use 0.5: the EMA after 10 steps is 1.0062410 (ramp at s + 1: 1.0030807; no warmup:
    0.9992676; no clamp at 0.5, i.e. the ramp alone: 0.9999905)."""
    k = 10
    expected = recurrence_ema(k, 0.5)
    assert expected == pytest.approx(1.0062410016454133, rel=1e-12)
    # the closed form up to step 8, then geometric with 0.5
    e8 = closed_form_ema(8)
    geometric = 0.5 ** (k - 8) * e8 + sum(0.5 ** (k - 1 - s) * 0.5 * theta(s) for s in range(8, k))
    assert expected == pytest.approx(geometric, rel=1e-12)
    ema = _train_with_hand_set_weights(tiny, k, 0.5, monkeypatch)
    torch.testing.assert_close(ema, torch.full_like(ema, expected), rtol=0, atol=2e-6)


LR = 2e-3


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
