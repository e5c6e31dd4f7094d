import pytest
import torch

from ddpmkit.config import DiffusionConfig
from ddpmkit.samplers import SAMPLERS, Denoiser, ImageNoise, ddim, ddpm, make_timesteps, nfe
from ddpmkit.schedule import Schedule


class ExactGaussianNet(torch.nn.Module):
    """The exact eps-predictor for data x0 ~ N(mu, sd^2) per pixel: E[x0 | x_t] in closed form."""

    def __init__(self, schedule, mu, sd, prediction="eps"):
        super().__init__()
        self.s, self.mu, self.var, self.prediction = schedule, mu, sd**2, prediction

    def forward(self, x, t):
        a = self.s.abar(t, x)
        x0 = self.mu + a.sqrt() * self.var / (a * self.var + 1 - a) * (x - a.sqrt() * self.mu)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction]


def _gaussian_run(sampler, steps, prediction="eps", spacing="uniform", mu=0.3, sd=0.5,
                  schedule="linear", exact_ode_error=False, **options):
    """Samples from pure noise with the exact denoiser. exact_ode_error: instead, the RMS distance
    of a deterministic sampler's images from the probability-flow ODE's exact endpoints, which for
    Gaussian data map x_T = sqrt(abar) mu + sqrt(abar sd^2 + 1 - abar) z to mu + sd z."""
    schedule = Schedule.from_config(DiffusionConfig(schedule=schedule))
    denoiser = Denoiser(ExactGaussianNet(schedule, mu, sd, prediction), schedule, prediction,
                        clip_x0=False)
    torch.manual_seed(0)
    x = torch.randn(4000, 1, 2, 2)
    timesteps = make_timesteps(steps, schedule, spacing)
    out = SAMPLERS[sampler](denoiser, x, timesteps, lambda: torch.randn_like(x), **options)
    if not exact_ode_error:
        return out
    a = schedule.abar_at(timesteps[0])
    exact = mu + sd * (x - a**0.5 * mu) / (a * sd**2 + 1 - a) ** 0.5
    return (out - exact).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("sampler,steps,spacing,options", [
    ("ddpm", 1000, "uniform", {"variance": "small"}),
    ("ddim", 1000, "uniform", {"eta": 0.0}),
    ("ddim", 1000, "uniform", {"eta": 1.0}),
    ("dpmpp-2m", 50, "karras", {}),
    ("dpmpp-2m-sde", 250, "karras", {}),
    ("euler", 500, "karras", {}),
    ("heun", 50, "karras", {}),
])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_exact_denoiser_reproduces_gaussian_data(sampler, steps, spacing, options, prediction):
    """Driven by the exact denoiser, each sampler returns the data's mean and std: exactly with all
    T steps for ddpm/ddim, up to a small discretisation error for the fast ones."""
    out = _gaussian_run(sampler, steps, prediction, spacing, **options)
    assert out.mean().item() == pytest.approx(0.3, abs=0.015)
    assert out.std().item() == pytest.approx(0.5, rel=0.02)


@pytest.mark.parametrize("sampler,spacing",
                         [("ddim", "uniform"), ("ddim", "quadratic"), ("ddpm", "uniform")])
def test_respaced_sampling_converges_to_the_data_variance(sampler, spacing):
    """Fewer steps means discretisation error, shrinking as steps grow (measured: DDIM uniform std
    0.36 / 0.47 / 0.50 at 10 / 50 / 200 steps for data std 0.5)."""
    errors = [abs(_gaussian_run(sampler, n, spacing=spacing).std().item() - 0.5)
              for n in (10, 50, 200)]
    assert errors[0] > errors[1] > errors[2] and errors[0] > 0.05
    assert errors[2] < 0.025


def test_ddim_at_eta_1_is_ddpm_and_the_large_variance_is_another_sampler():
    """DDIM's sigma at eta=1 is the DDPM posterior's std and its mean the posterior mean (Song et
    al. eq. 16), so with the same noise the two agree on every respaced step; beta (large) as the
    variance is a different sampler. Marginals alone cannot tell these apart: both are exact."""
    schedule = Schedule.from_config(DiffusionConfig())
    denoiser = Denoiser(ExactGaussianNet(schedule, 0.3, 0.5), schedule, "eps", clip_x0=False)
    timesteps = make_timesteps(10, schedule, "uniform")

    def run(sampler, **options):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(500, 1, 2, 2, generator=g)
        return sampler(denoiser, x, timesteps, lambda: torch.randn(x.shape, generator=g),
                       **options)

    small = run(ddpm, variance="small")
    assert (run(ddim, eta=1.0) - small).abs().max().item() < 1e-3
    assert (run(ddpm, variance="large") - small).abs().max().item() > 0.3


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_each_sampler_calls_the_network_as_often_as_nfe_says(sampler):
    schedule = Schedule.from_config(DiffusionConfig())
    net = ExactGaussianNet(schedule, 0.3, 0.5)
    calls = []
    net.register_forward_hook(lambda *_: calls.append(1))
    denoiser = Denoiser(net, schedule, "eps", clip_x0=False)
    for steps in (1, 2, 10):
        calls.clear()
        x = torch.randn(4, 1, 2, 2)
        SAMPLERS[sampler](denoiser, x, make_timesteps(steps, schedule, "karras"),
                          lambda: torch.randn_like(x))
        assert len(calls) == nfe(sampler, steps), (steps, len(calls))


def test_dpm_solver_beats_ddim_at_equal_steps():
    """Second order against first: at 20 steps DPM-Solver++(2M) is far closer to the true std than
    DDIM (measured 0.021 vs 0.068), and its error falls faster with steps."""
    err = {(s, n): abs(_gaussian_run(s, n).std().item() - 0.5) for s in ("ddim", "dpmpp-2m")
           for n in (20, 40)}
    assert err["dpmpp-2m", 20] < 0.5 * err["ddim", 20]
    assert err["dpmpp-2m", 40] < 0.2 * err["ddim", 40]


def test_heun_on_the_cosine_schedule_follows_the_ode():
    """The cosine schedule's t=T-1 is sigma 20,291, the next uniform step sigma ~15: a Heun
    correction across that jump multiplied the x0 estimates' difference by ~700 (error 0.36 at 25
    steps). Its first step is Euler's, which is exact there up to the data's size against sigma."""
    # 0.002; 0.36 before
    assert _gaussian_run("heun", 25, schedule="cosine", exact_ode_error=True) < 0.01
    assert _gaussian_run("heun", 25, exact_ode_error=True) < 0.01  # linear: 0.006, as before


def test_dpm_solver_keeps_second_order_to_the_end_of_trailing_spacing():
    """The first-order final step guards a step into t=0; trailing spacing stops at T/n - 1, where
    dropping to first order only adds error."""
    # 0.096 (0.120 before)
    assert _gaussian_run("dpmpp-2m", 10, spacing="trailing", exact_ode_error=True) < 0.105
    # 0.013: ends at t=0, first order into it
    assert _gaussian_run("dpmpp-2m", 10, spacing="karras", exact_ode_error=True) < 0.02


def test_karras_spacing_on_cosine_spends_its_steps_below_edms_sigma_max():
    """The cosine schedule's last sigma is 20,291 (its betas are clipped at 0.999): a ramp from it
    spent most steps on pure noise. From sigma 80 after the first step the ODE errors are those of
    the linear schedule (old: heun-10 1.04, dpmpp-2m-10 0.216, euler-20 0.155)."""
    errors = {(s, n): _gaussian_run(s, n, spacing="karras", schedule="cosine", exact_ode_error=True)
              for s, n in (("heun", 10), ("dpmpp-2m", 10), ("euler", 20))}
    assert errors[("heun", 10)] < 0.15 and errors[("dpmpp-2m", 10)] < 0.02
    assert errors[("euler", 20)] < 0.08


def test_quadratic_spacing_starts_from_pure_noise_on_cosine():
    """The DDIM code's quadratic spacing stopped at 0.8 T, where the cosine schedule keeps 31% of
    the signal: started there from pure noise, the images' mean came out at two thirds of the
    data's."""
    out = _gaussian_run("ddim", 50, spacing="quadratic", schedule="cosine")
    assert (out.mean().item() == pytest.approx(0.3, abs=0.015)
            and out.std().item() == pytest.approx(0.5, rel=0.03))


def test_timesteps_spacings():
    assert make_timesteps(1000, 1000) == list(range(999, -1, -1))
    uni = make_timesteps(50, 1000)
    assert uni[0] == 999 and uni[-1] == 0 and len(uni) == 50 and uni == sorted(uni, reverse=True)
    quad = make_timesteps(50, 1000, "quadratic")
    # from pure noise, as the others
    assert len(set(quad)) == 50 and quad[0] == 999 and quad[-1] == 0
    gaps = [a - b for a, b in zip(quad, quad[1:])]
    assert gaps[0] > gaps[-1]  # denser near t=0
    trailing = make_timesteps(50, 1000, "trailing")
    assert trailing[0] == 999 and trailing[-1] == 19 and len(set(trailing)) == 50
    schedule = Schedule.from_config(DiffusionConfig())
    karras = make_timesteps(20, schedule, "karras")
    assert karras[0] == pytest.approx(999) and karras[-1] == pytest.approx(0, abs=1e-9)
    assert (all(a > b for a, b in zip(karras, karras[1:]))
            and not all(float(t).is_integer() for t in karras))
    # pure noise, then from EDM's sigma_max 80 (this schedule's last sigma is 157) evenly spaced
    # in sigma^(1/7)
    sig = [schedule.sigma_at(t) for t in karras[1:]]
    assert schedule.sigma_at(999) > 150 and sig[0] == pytest.approx(80, rel=1e-9)
    roots = [s ** (1 / 7) for s in sig]
    assert max(abs((a - b) - (roots[0] - roots[1])) for a, b in zip(roots, roots[1:])) < 1e-6
    assert nfe("heun", 10) == 18 and nfe("heun", 1) == 1 and nfe("dpmpp-2m", 10) == 10


@pytest.mark.parametrize("T", [10, 1000])
def test_every_step_count_gives_that_many_distinct_timesteps_in_range(T):
    schedule = Schedule.from_config(DiffusionConfig(num_timesteps=T))
    for spacing in ("uniform", "quadratic", "trailing", "karras"):
        for steps in (range(1, T + 1) if spacing != "karras" else {1, 2, 7, min(61, T), T}):
            ts = make_timesteps(steps, schedule, spacing)
            assert len(ts) == steps and 0 <= ts[-1] and ts[0] <= T - 1, (spacing, steps, ts[-3:])
            assert all(a > b for a, b in zip(ts, ts[1:])), (spacing, steps)
        # one step starts from pure noise
        assert make_timesteps(1, schedule, spacing) == [pytest.approx(T - 1)]


def test_trailing_spacing_at_a_step_count_that_does_not_divide_T():
    """61 steps into 1000: float arange used to add a 62nd
    timestep, -1, sending the last step back to noise."""
    out = _gaussian_run("dpmpp-2m", 61, spacing="trailing")
    assert (out.mean().item() == pytest.approx(0.3, abs=0.03)
            and out.std().item() == pytest.approx(0.5, abs=0.03))


def test_fractional_timesteps_interpolate_the_schedule():
    s = Schedule.from_config(DiffusionConfig())
    assert s.abar_at(10) == s.alphas_cumprod[10]
    assert s.alphas_cumprod[11] < s.abar_at(10.5) < s.alphas_cumprod[10]
    assert s.t_at_sigma(s.sigma_at(123.25)) == pytest.approx(123.25)


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * (t.float()[:, None, None, None] / 100)


@pytest.mark.parametrize("sampler,options", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("dpmpp-2m", {}),
                                             ("dpmpp-2m-sde", {}), ("euler", {}), ("heun", {})])
def test_images_do_not_depend_on_batch_size(sampler, options):
    torch.manual_seed(0)
    schedule = Schedule.from_config(DiffusionConfig(num_timesteps=100))
    den = Denoiser(TinyNet(), schedule, "eps")
    ts = make_timesteps(20, 100)

    def run(indices):
        noise = ImageNoise(seed=7, indices=indices, shape=(1, 6, 6), device="cpu")
        return SAMPLERS[sampler](den, noise(), ts, noise, **options)

    together = run(list(range(6)))
    alone = torch.cat([run([0, 1]), run([2]), run([3, 4, 5])])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    assert not torch.allclose(run([0]), run([1]))
    torch.testing.assert_close(run([3]), together[3:4], rtol=0, atol=1e-6)


def test_ddim_eta0_is_deterministic_and_ddpm_uses_noise():
    schedule = Schedule.from_config(DiffusionConfig(num_timesteps=100))
    den = Denoiser(TinyNet(), schedule, "eps")
    x = torch.randn(3, 1, 4, 4)
    ts = make_timesteps(10, 100)
    a = ddim(den, x, ts, lambda: torch.randn_like(x))
    b = ddim(den, x, ts, lambda: torch.randn_like(x))
    torch.testing.assert_close(a, b)
    c = ddpm(den, x, ts, lambda: torch.randn_like(x))
    d = ddpm(den, x, ts, lambda: torch.randn_like(x))
    assert not torch.allclose(c, d)


def test_ddim_one_step_from_noise_returns_the_x0_estimate():
    schedule = Schedule.from_config(DiffusionConfig(num_timesteps=100))
    den = Denoiser(TinyNet(), schedule, "eps", clip_x0=False)
    x = torch.randn(2, 1, 4, 4)
    out = ddim(den, x, [99], lambda: torch.randn_like(x))
    x0, _ = den(x, 99)
    torch.testing.assert_close(out, x0)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_dpmpp_last_step_order_does_not_hang_on_rounding(schedule_name):
    """Karras spacing reaches t=0 through exp and log; on the cosine schedule that used to be
    9.5e-15, not 0, which switched the last DPM-Solver++ step to second order and moved 10-step
    images by up to 2."""
    schedule = Schedule.from_config(DiffusionConfig(schedule=schedule_name))
    ts = make_timesteps(10, schedule, "karras")
    assert ts[0] == 999.0 and ts[-1] == 0.0
    den = Denoiser(TinyNet(), schedule, "eps")
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = SAMPLERS["dpmpp-2m"](den, x, ts, lambda: torch.randn_like(x))
    rounded = SAMPLERS["dpmpp-2m"](den, x, [*ts[:-1], 1e-12], lambda: torch.randn_like(x))
    torch.testing.assert_close(rounded, exact, rtol=0, atol=1e-5)
