import numpy as np
import pytest
import torch

from ddpmkit.config import DiffusionConfig
from ddpmkit.schedule import Schedule, cosine_betas, linear_betas, x0_eps_from_output


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_is_monotone_and_in_range(kind):
    s = Schedule.from_config(DiffusionConfig(schedule=kind))
    a = s.alphas_cumprod
    assert len(a) == 1000
    assert np.all(np.diff(a) < 0)
    assert 0 < a[-1] < a[0] < 1


def test_linear_schedule_matches_ddpm_paper():
    b = linear_betas(1000, 1e-4, 0.02)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    # abar_T is ~4e-5 for the paper's schedule: x_T is essentially pure noise
    assert np.cumprod(1 - b)[-1] == pytest.approx(4.04e-5, rel=0.01)


def test_cosine_schedule_follows_its_formula():
    T, s = 1000, 0.008
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    abar = np.cumprod(1 - cosine_betas(T))
    t = np.arange(1, 900)  # before the 0.999 clipping matters
    np.testing.assert_allclose(abar[t - 1], f(t) / f(0), rtol=1e-6)


def test_q_sample_moments():
    s = Schedule.from_config(DiffusionConfig())
    torch.manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    for step in (0, 250, 999):
        t = torch.full((len(x0),), step)
        xt = s.q_sample(x0, t, torch.randn_like(x0))
        a = s.alphas_cumprod[step]
        assert xt.mean().item() == pytest.approx(np.sqrt(a) * 0.7, abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - a, rel=2e-2, abs=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_round_trips_are_exact(prediction):
    s = Schedule.from_config(DiffusionConfig(schedule="cosine"))
    torch.manual_seed(1)
    x0, eps = torch.randn(64, 1, 4, 4), torch.randn(64, 1, 4, 4)
    t = torch.randint(0, 1000, (64,))
    xt = s.q_sample(x0, t, eps)
    target = s.target(prediction, x0, eps, t)
    a = s.abar(t, xt)
    x0_hat, eps_hat = x0_eps_from_output(prediction, target, xt, a.sqrt(), (1 - a).sqrt())
    # /sqrt(abar) near T
    tol = dict(atol=2e-3, rtol=1e-3) if prediction == "eps" else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_hat, x0, **tol)
    torch.testing.assert_close(eps_hat, eps, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x0_eps_from_output("x0", x0, xt, a.sqrt(), (1 - a).sqrt())[1], eps,
                               atol=1e-3, rtol=1e-3)


def test_v_target_definition():
    s = Schedule.from_config(DiffusionConfig())
    x0, eps, t = torch.randn(8, 3), torch.randn(8, 3), torch.arange(8) * 100
    a = torch.tensor(s.alphas_cumprod[t.numpy()], dtype=torch.float32)[:, None]
    torch.testing.assert_close(s.target("v", x0, eps, t), a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_linear_betas_scale_with_T_unless_given():
    """Ho et al.'s 1e-4..0.02 at T=1000 leave abar(T-1) = 4e-5; taken as given at T=100 they would
    leave 0.36 (60% of the signal) where sampling starts from pure noise. Unset, they scale by
    1000/T."""
    from ddpmkit.config import load_config

    default = DiffusionConfig()
    assert (default.beta_start, default.beta_end) == (1e-4, 0.02)
    for T in (1000, 250, 100, 8):
        assert Schedule.from_config(DiffusionConfig(num_timesteps=T)).abar_at(T - 1) < 1e-3, T
    given = DiffusionConfig(num_timesteps=100, beta_start=1e-4, beta_end=0.02)
    assert Schedule.from_config(given).abar_at(99) == pytest.approx(0.364, abs=0.001)
    cfg = load_config(None, {"diffusion.num_timesteps": 100})
    # recorded as numbers
    assert (cfg.diffusion.beta_start, cfg.diffusion.beta_end) == pytest.approx((1e-3, 0.2))
