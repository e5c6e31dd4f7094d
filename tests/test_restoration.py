"""Restoration: the noise-level mapping, denoising (known answer with an exact denoiser),
img2img, RePaint inpainting and the folder runner."""

from __future__ import annotations

import csv
import json
import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from ddpmkit.config import DiffusionConfig, load_config, updated
from ddpmkit.errors import UserError
from ddpmkit.pixels import read_image
from ddpmkit.restoration import (
    denoise,
    denoise_tensor,
    estimate_sigma,
    img2img,
    img2img_tensor,
    inpaint,
    repaint_schedule,
    restore_folder,
    sigma_range,
    sigma_to_timestep,
)
from ddpmkit.run import Run, load_run
from ddpmkit.samplers import SAMPLERS, Denoiser, ImageNoise, timesteps_from
from ddpmkit.schedule import Schedule
from ddpmkit.training import train


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model trained for a few steps on the 8x8 digits: not good, but a real network."""
    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path_factory.mktemp("restore"), **{"train.max_steps": 20})
    return load_run(train(cfg, log=lambda *a: None, progress=False).path)


class ExactGaussianNet(torch.nn.Module):
    """The exact eps-predictor for x0 ~ N(mu, sd^2) per pixel, at fractional t too (abar_at)."""

    def __init__(self, schedule, mu, sd):
        super().__init__()
        self.s, self.mu, self.var = schedule, mu, sd**2
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # so the run has a device

    def forward(self, x, t, labels=None):
        a = self.s.abar_at(float(t[0]))
        x0 = (self.mu
              + math.sqrt(a) * self.var / (a * self.var + 1 - a) * (x - math.sqrt(a) * self.mu))
        return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)


def _gaussian_run(mu, sd, size=8, schedule="linear"):
    cfg = load_config(None, {"data.image_size": size, "model.in_channels": 1,
                             "diffusion.schedule": schedule})
    s = Schedule.from_config(cfg.diffusion)
    return Run(path=__import__("pathlib").Path("gauss"), config=cfg,
               net=ExactGaussianNet(s, mu, sd), schedule=s, step=0, checkpoint="exact")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sigma_to_timestep_is_exact(schedule):
    s = Schedule.from_config(DiffusionConfig(schedule=schedule))
    for t in [0, 1, 17, 250, 998, 999]:  # integer t: exactly, and the table's abar reproduces sigma
        sigma = math.sqrt((1 - s.alphas_cumprod[t]) / s.alphas_cumprod[t]) / 2
        t_back = sigma_to_timestep(s, sigma)
        assert t_back == t
        assert (math.sqrt((1 - s.abar_at(t_back)) / s.abar_at(t_back))
                == pytest.approx(2 * sigma, rel=1e-12))
    # fractional t: round trip through the log-sigma interpolation
    for t in np.linspace(0.3, 998.7, 57):
        t_back = sigma_to_timestep(s, s.sigma_at(t) / 2)
        assert t_back == pytest.approx(t, abs=1e-6)
        a = s.abar_at(t_back)
        assert math.sqrt((1 - a) / a) == pytest.approx(s.sigma_at(t), rel=1e-6)
    lo, hi = sigma_range(s)
    with pytest.raises(UserError, match="outside"):
        sigma_to_timestep(s, lo / 2)
    with pytest.raises(UserError, match="outside"):
        sigma_to_timestep(s, hi * 2)


def test_timesteps_from():
    assert timesteps_from(5.5) == [5.5, 5, 4, 3, 2, 1, 0]
    assert timesteps_from(5.0) == [5.0, 4, 3, 2, 1, 0]
    assert timesteps_from(40.2, 1) == [40.2]
    # trailing: the last step from ~t/5 to clean
    assert timesteps_from(40.2, 5) == [40.2, 32, 24, 16, 8]
    # not [499.5, 499]: a call spent on half a timestep
    assert timesteps_from(499.5, 2) == [499.5, 250]
    # more calls than integers: all
    assert timesteps_from(10.6, 12) == [10.6] + list(range(10, -1, -1))
    for t, n in ((7.9, 5), (10.6, 8), (999.0, 50)):
        ts = timesteps_from(t, n)
        assert len(ts) == n and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] > 0
    # no first step of a sliver: 0.07 * 600 is one rounding above 42
    assert timesteps_from(0.07 * 600)[:2] == [0.07 * 600, 41.0]
    assert timesteps_from(7.2)[:2] == [7.2, 6.0] and timesteps_from(7.6)[:2] == [7.6, 7.0]
    assert timesteps_from(0.3) == [0.3]


def test_img2img_at_a_start_just_above_an_integer_works_with_every_sampler():
    """t = 0.07 * 600 = 42.00000000000001: a first step from it to 42 made DDIM, DDPM and the SDE
    solver take the root of a negative variance and DPM-Solver++ divide by a step of 1e-14."""
    mu, sd = 0.0, 0.5
    cfg = load_config(None, {"data.image_size": 8, "model.in_channels": 1,
                             "diffusion.num_timesteps": 601})
    s = Schedule.from_config(cfg.diffusion)
    den = Denoiser(ExactGaussianNet(s, mu, sd), s, "eps", clip_x0=False)
    x0 = mu + sd * torch.randn(500, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for sampler in SAMPLERS:
        out = img2img_tensor(den, x0, strength=0.07, sampler=sampler, steps=50)
        assert torch.isfinite(out).all() and 0.4 < out.std().item() < 0.6, sampler


def test_img2img_with_few_calls_follows_the_ode():
    """SDEdit on Gaussian data with DDIM against the exact probability-flow ODE: evenly spaced
    calls (RMS error 0.19 at 3 calls) where the old grid spent one on a sliver of a step (0.28)."""
    mu, sd = 0.2, 0.3
    run = _gaussian_run(mu, sd)
    den = Denoiser(run.net, run.schedule, "eps", clip_x0=False)
    x0 = mu + sd * torch.randn(2000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = img2img_tensor(den, x0, strength=0.6, seed=0, sampler="ddim", steps=3)
    s = run.schedule
    t = 0.6 * (s.num_timesteps - 1)
    a = s.abar_at(t)
    noise = ImageNoise(0, list(range(2000)), (1, 2, 2), "cpu")
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise()
    exact = mu + sd * (x_t - math.sqrt(a) * mu) / math.sqrt(a * sd**2 + 1 - a)
    assert (out - exact).pow(2).mean().sqrt().item() < 0.22


def test_denoising_by_sampling_refuses_deterministic_samplers():
    run = _gaussian_run(0.1, 0.4)
    den = Denoiser(run.net, run.schedule, "eps", clip_x0=False)
    y = torch.zeros(2, 1, 2, 2)
    for sampler in ("ddim", "dpmpp-2m", "euler", "heun"):
        with pytest.raises(UserError, match=f"'{sampler}' is deterministic"):
            denoise_tensor(den, y, 0.2, method="sample", sampler=sampler)
    assert denoise_tensor(den, y, 0.2, method="sample",
                          sampler="dpmpp-2m-sde", steps=5).shape == y.shape


def test_denoise_mmse_is_the_gaussian_posterior_mean():
    """Known answer: for x ~ N(mu, s^2) per pixel and y = x + sigma_m n, E[x | y] =
    mu + s^2 / (s^2 + sigma_m^2) (y - mu); the exact denoiser at the matched t must return it."""
    mu, sd = 0.2, 0.3
    run = _gaussian_run(mu, sd)
    den = Denoiser(run.net, run.schedule, "eps", clip_x0=False)
    g = torch.Generator().manual_seed(0)
    x = mu + sd * torch.randn(16, 1, 8, 8, generator=g)
    for sigma in [0.05, 0.1, 0.2, 0.4, 0.0123]:  # [0, 1] scale: 2*sigma on the model's scale
        sm = 2 * sigma
        y = x + sm * torch.randn(x.shape, generator=g)
        expect = mu + sd**2 / (sd**2 + sm**2) * (y - mu)
        torch.testing.assert_close(denoise_tensor(den, y, sigma), expect, atol=1e-5, rtol=1e-5)
    # The uint8 API: the same answer computed from the quantised input, to within one level.
    y8 = ((x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1) * 127.5
          + 127.5).round().to(torch.uint8)
    yq = y8.float() / 127.5 - 1
    expect = mu + sd**2 / (sd**2 + 0.2**2) * (yq - mu)  # sigma 0.1 -> 0.2 on the model scale
    got = denoise(run, y8, 0.1, clip_x0=False).float()
    assert (got - (expect.clamp(-1, 1) * 127.5 + 127.5)).abs().max() <= 0.51


def test_denoise_sampling_averages_to_the_posterior_mean():
    """method='sample' draws from p(x | y): for the Gaussian model, mean mu + k (y - mu) and
    variance k sigma_m^2 with k = s^2 / (s^2 + sigma_m^2)."""
    mu, sd, sigma = 0.1, 0.4, 0.2
    run = _gaussian_run(mu, sd)
    den = Denoiser(run.net, run.schedule, "eps", clip_x0=False)
    y = torch.full((3000, 1, 2, 2), 0.5)
    k = sd**2 / (sd**2 + (2 * sigma) ** 2)
    # all integer steps below t
    draws = denoise_tensor(den, y, sigma, method="sample", sampler="ddpm")
    assert draws.mean().item() == pytest.approx(mu + k * (0.5 - mu), abs=0.01)
    assert draws.std().item() == pytest.approx(math.sqrt(k) * 2 * sigma, rel=0.05)


def test_estimate_sigma_within_10_percent():
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images[:20] / 16.0).float()[:, None]
    smooth = torch.nn.functional.interpolate(digits, size=(64, 64), mode="bicubic",
                                             align_corners=False)
    smooth = 0.25 + 0.5 * smooth.clamp(0, 1)  # [0, 1] scale, away from the ends
    g = torch.Generator().manual_seed(1)
    for sigma in (0.05, 0.1, 0.2):
        noisy = smooth + sigma * torch.randn(smooth.shape, generator=g)
        est = np.array(estimate_sigma(noisy.numpy()))
        assert np.median(est) == pytest.approx(sigma, rel=0.10)
        assert np.all(np.abs(est / sigma - 1) < 0.2)
    rgb = (0.5 + 0.1 * torch.randn(2, 3, 64, 64, generator=g)).clamp(0, 1)
    assert estimate_sigma((rgb * 255).round().to(torch.uint8)) == pytest.approx([0.1, 0.1], rel=0.1)


def test_strength_zero_is_the_identity(tiny_run):
    imgs = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(img2img(tiny_run, imgs, strength=0.0), imgs)
    out = img2img(tiny_run, imgs, strength=0.5, seed=3, steps=5)
    assert out.shape == imgs.shape and out.dtype == torch.uint8 and not torch.equal(out, imgs)


def test_results_do_not_depend_on_the_batch(tiny_run):
    imgs = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    whole = img2img(tiny_run, imgs, strength=0.6, seed=1, sampler="ddpm", steps=6)
    parts = torch.cat([img2img(tiny_run, imgs[i:i + 1], 0.6, 1, "ddpm", 6, indices=[i])
                       for i in range(4)])
    # same noise; float batching differences only
    assert (whole.int() - parts.int()).abs().max() <= 1
    a = denoise(tiny_run, imgs, 0.1, method="sample", samples=2, seed=5, steps=4)
    assert torch.equal(a, denoise(tiny_run, imgs, 0.1, method="sample", samples=2, seed=5, steps=4))


def test_inpainting_keeps_known_pixels(tiny_run):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=g)
    fill = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    fill[:, :, 2:6, 2:6] = True
    imgs[fill] = 255  # garbage where the fill goes
    out = inpaint(tiny_run, imgs, fill, seed=0, steps=10, jump_length=3, resamplings=2)
    assert torch.equal(out[~fill], imgs[~fill])  # bit for bit
    assert not torch.equal(out[fill], imgs[fill])
    assert (out[fill] != 255).float().mean() > 0.5


def test_repaint_schedule():
    seq = repaint_schedule(20, 5, 3)
    assert seq[0] == 19 and seq[-1] == -1
    down = sum(1 for a, b in zip(seq, seq[1:]) if b < a)
    up = sum(1 for a, b in zip(seq, seq[1:]) if b > a)
    assert up == 3 * 5 * 2  # jump points 0, 5, 10 (< 20 - 5), each redone twice, 5 levels up
    assert down == 20 + up
    assert repaint_schedule(7, 10, 10) == [6, 5, 4, 3, 2, 1, 0, -1]  # no room to jump


def test_wrong_size_or_channels_refused(tiny_run):
    with pytest.raises(UserError,
                       match="6x7 pixels, but the model takes 1 channel.* at 8x8 or larger"):
        denoise(tiny_run, torch.zeros(1, 1, 7, 6, dtype=torch.uint8), 0.1)
    with pytest.raises(UserError, match="3 channel"):
        img2img(tiny_run, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0.5)
    with pytest.raises(UserError, match="outside"):
        denoise(tiny_run, torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 1000.0)


def _write_pngs(folder, arrays, names):
    folder.mkdir(parents=True, exist_ok=True)
    for a, n in zip(arrays, names):
        Image.fromarray(a, "L").save(folder / n)


def test_folder_runner_layout(tiny_run, tmp_path):
    rng = np.random.default_rng(0)
    names = ["b.png", "a.png", "c.png"]
    _write_pngs(tmp_path / "in", [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in names],
                names)
    out = restore_folder(tiny_run, "denoise", tmp_path / "in", tmp_path / "out", sigma="auto",
                         log=lambda *a: None)
    assert sorted(p.name for p in (out / "individual").iterdir()) == ["a.png", "b.png", "c.png"]
    grid = read_image(out / "grid.png")
    assert grid.shape[0] == 1 and grid.shape[1] < grid.shape[2]  # two rows of three
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["output"] for r in rows] == ["individual/a.png", "individual/b.png",
                                           "individual/c.png"]
    assert all(r["kind"] == "denoise" and float(r["sigma"]) > 0 for r in rows)
    assert json.loads(rows[0]["parameters"])["method"] == "mmse"
    assert all(r["seed"] == "" for r in rows)  # the posterior mean draws no noise
    assert not list(out.rglob(".*.tmp"))
    # the same job again is a rerun; another job (other inputs, level, seed or kind) is refused,
    # and with fresh the earlier outputs go (the manifest listed only the new ones, beside stale
    # files) while files ddpmkit did not write stay
    restore_folder(tiny_run, "denoise", tmp_path / "in", out, sigma="auto", log=lambda *a: None)
    _write_pngs(tmp_path / "in_b", [rng.integers(0, 256, (8, 8), dtype=np.uint8)], ["z.png"])
    (out / "individual" / "mine.txt").write_text("not an output")
    for inputs, options in ((tmp_path / "in_b", {"sigma": "auto"}),
                            (tmp_path / "in", {"sigma": 0.1}), (tmp_path / "in", {"seed": 1}),
                            (tmp_path / "in", {"kind": "img2img"})):
        kind = options.pop("kind", "denoise")
        with pytest.raises(UserError, match="--fresh"):
            restore_folder(tiny_run, kind, inputs, out, log=lambda *a: None, **options)
    assert sorted(p.name for p in (out / "individual").iterdir()) == [
        "a.png", "b.png", "c.png", "mine.txt"]
    restore_folder(tiny_run, "denoise", tmp_path / "in_b", out, sigma=0.1, fresh=True,
                   log=lambda *a: None)
    restore_folder(tiny_run, "denoise", tmp_path / "in_b", out, sigma="0.10",  # the same job
                   log=lambda *a: None)
    assert sorted(p.name for p in (out / "individual").iterdir()) == ["mine.txt", "z.png"]
    # nor does it write into a sampling job's folder, a training run, or a folder of someone's files
    foreign = tmp_path / "foreign"
    _write_pngs(foreign / "individual", [np.zeros((8, 8), np.uint8)], ["keep.png"])
    for target, says in ((tiny_run.path, "training run"),
                         (foreign, "no ddpmkit restoration wrote")):
        with pytest.raises(UserError, match=says):
            restore_folder(tiny_run, "denoise", tmp_path / "in_b", target, sigma=0.1,
                           log=lambda *a: None)
    assert [p.name for p in (foreign / "individual").iterdir()] == ["keep.png"]

    # inpainting: masks by name; known pixels of the files unchanged
    masks = [np.zeros((8, 8), np.uint8) for _ in names]
    for m in masks:
        m[3:5, :] = 255
    _write_pngs(tmp_path / "masks", masks, names)
    out2 = restore_folder(tiny_run, "inpaint", tmp_path / "in", tmp_path / "out2",
                          masks_dir=tmp_path / "masks", steps=5, jump_length=2, resamplings=2,
                          log=lambda *a: None)
    for n in names:
        before, after = read_image(tmp_path / "in" / n), read_image(out2 / "individual" / n)
        assert torch.equal(before[:, :3], after[:, :3]) and torch.equal(before[:, 5:], after[:, 5:])
    # a mask with nothing to fill is said, and its image comes back as it was
    _write_pngs(tmp_path / "masks", [np.zeros((8, 8), np.uint8)], ["c.png"])
    said = []
    restore_folder(tiny_run, "inpaint", tmp_path / "in", tmp_path / "out2b",
                   masks_dir=tmp_path / "masks", steps=2, jump_length=1, resamplings=1,
                   log=said.append)
    assert said[0] == "note: 1 mask(s) have no white (fill) pixel, c.png's first: those images " \
                      "come back unchanged"
    assert torch.equal(read_image(tmp_path / "in" / "c.png"),
                       read_image(tmp_path / "out2b" / "individual" / "c.png"))
    # not silently RePaint's 250
    with pytest.raises(UserError, match="steps must be at least 1, got 0"):
        restore_folder(tiny_run, "inpaint", tmp_path / "in", tmp_path / "o0",
                       masks_dir=tmp_path / "masks", steps=0)
    assert not (tmp_path / "o0").exists()
    with pytest.raises(UserError, match="--seed must not be negative, got -1"):
        restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "o0", seed=-1)
    with pytest.raises(UserError, match="--strength must be in"):
        restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "o0", strength=1.5)
    with pytest.raises(UserError, match="sigma=9999 is outside"):
        restore_folder(tiny_run, "denoise", tmp_path / "in", tmp_path / "o0", sigma="9999")
    assert not (tmp_path / "o0").exists()  # refused before the folder was claimed
    # a missing or wrong-sized mask is named
    (tmp_path / "masks" / "c.png").unlink()
    with pytest.raises(UserError, match="c.png"):
        restore_folder(tiny_run, "inpaint", tmp_path / "in", tmp_path / "o3",
                       masks_dir=tmp_path / "masks")
    _write_pngs(tmp_path / "masks", [np.zeros((9, 8), np.uint8)], ["c.png"])
    with pytest.raises(UserError, match="mask .*c.png"):
        restore_folder(tiny_run, "inpaint", tmp_path / "in", tmp_path / "o3",
                       masks_dir=tmp_path / "masks")
    # a too small input is named
    _write_pngs(tmp_path / "in", [np.zeros((6, 6), np.uint8)], ["d.png"])
    with pytest.raises(UserError, match="d.png"):
        restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "o4")


def test_missing_scikit_image_is_a_user_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pywt", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install scikit-image"):
        estimate_sigma(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))


def test_inpainting_with_the_exact_denoiser_fills_with_the_conditional_mean():
    """Independent Gaussian pixels: the known ones say nothing about the unknown ones, so the filled
    pixels are draws from N(mu, sd^2); their mean and spread show RePaint's reverse steps are
    right."""
    mu, sd = 0.2, 0.3
    run = _gaussian_run(mu, sd, size=8)
    run.schedule = Schedule.from_config(DiffusionConfig(num_timesteps=1000))
    run.net = ExactGaussianNet(run.schedule, mu, sd)
    imgs = torch.full((200, 1, 8, 8), 20, dtype=torch.uint8)
    fill = torch.zeros(200, 1, 8, 8, dtype=torch.bool)
    fill[:, :, :4] = True
    # all T: exact steps
    out = inpaint(run, imgs, fill, steps=None, jump_length=10, resamplings=3, clip_x0=False)
    filled = out[fill].float() / 127.5 - 1
    assert torch.equal(out[~fill], imgs[~fill])
    assert filled.mean().item() == pytest.approx(mu, abs=0.02)
    assert filled.std().item() == pytest.approx(sd, rel=0.1)


def test_restoration_commands_end_to_end(tmp_path, capsys):
    from ddpmkit.cli import main
    from ddpmkit.config import load_config
    from ddpmkit.training import train
    from conftest import TINY

    run = tmp_path / "run"
    train(load_config(None, {**TINY, "train.out_dir": str(run), "train.max_steps": 10}),
          log=lambda *_: None, progress=False)
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
            tmp_path / "in" / f"x{i}.png")
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:6] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"x{i}.png")
    common = [str(run), str(tmp_path / "in"), "--steps", "4"]
    assert main(["denoise", *common[:2], "--sigma", "0.1", "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    assert main(["img2img", *common, "--strength", "0.3", "--out", str(tmp_path / "v"),
                 "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["inpaint", *common, "--mask", str(tmp_path / "masks"), "--resamplings", "2",
                 "--jump-length", "2", "--out", str(tmp_path / "f")]) == 0
    for out in ("d", "v", "f"):
        assert (sorted(p.name for p in (tmp_path / out / "individual").iterdir())
                == ["x0.png", "x1.png", "x2.png"])
        assert ((tmp_path / out / "grid.png").is_file()
                and (tmp_path / out / "manifest.csv").is_file())
    Image.fromarray(np.zeros((6, 16), np.uint8)).save(tmp_path / "in" / "small.png")
    assert main(["denoise", *common[:2], "--sigma", "0.1", "--out", str(tmp_path / "e")]) == 2
    assert "small.png" in capsys.readouterr().err and not (tmp_path / "e" / "individual").exists()


def test_wide_inputs_are_read_at_the_runs_bit_depth(tiny_run, tmp_path):
    """A run trained on 12-bit data reads a dark 16-bit input at 12 bits, as its training images
    were read, not at the 10 bits this one image's largest value would need on its own."""
    import copy

    run = copy.copy(tiny_run)
    run.config = updated(tiny_run.config, {"data.bit_depth": 12})
    wide = np.arange(64, dtype=np.uint16).reshape(8, 8) * 14  # largest 882: fits 10 bits
    (tmp_path / "in").mkdir()
    Image.fromarray(wide).save(tmp_path / "in" / "x.png")  # a 16-bit grayscale PNG
    restore_folder(run, "img2img", tmp_path / "in", tmp_path / "out", strength=0.0,
                   log=lambda *_: None)
    out = read_image(tmp_path / "out" / "individual" / "x.png")[0].numpy()
    assert np.array_equal(out, np.round(wide * (255 / 4095)).astype(np.uint8))
    assert out.max() == 55  # at 10 bits it would be 220
    # values beyond the run's depth are refused
    Image.fromarray(wide * 6).save(tmp_path / "in" / "x.png")
    with pytest.raises(UserError, match=r"x\.png: values up to 5292 do not fit the 12-bit range of "
                                        r"the images .* scale the image to 0\.\.4095 first"):
        restore_folder(run, "img2img", tmp_path / "in", tmp_path / "out2", strength=0.0,
                       log=lambda *_: None)
    assert not (tmp_path / "out2").exists()
    # 8-bit training images: a wide input at its own depth
    run.config = updated(tiny_run.config, {"data.bit_depth": 8})
    restore_folder(run, "img2img", tmp_path / "in", tmp_path / "out3", strength=0.0,
                   log=lambda *_: None)
    out = read_image(tmp_path / "out3" / "individual" / "x.png")[0].numpy()
    assert np.array_equal(out, np.round(wide * 6 * (255 / 16383)).astype(np.uint8))


def test_tiles_cover_every_pixel_and_blend_to_a_weighted_mean():
    from ddpmkit.tiling import TiledNet, tile_starts

    assert (tile_starts(8, 8, 2) == [0] and tile_starts(20, 8, 2) == [0, 6, 12]
            and tile_starts(9, 8, 2) == [0, 1])
    assert (tile_starts(50, 8, 2)[-1] == 42
            and all(b - a <= 6 for a, b in zip(tile_starts(50, 8, 2), tile_starts(50, 8, 2)[1:])))
    calls = []

    # pixel by pixel x + t + 100 * label, recording the shapes it was given
    class Spy(torch.nn.Module):
        def forward(self, x, t, labels=None):
            calls.append(tuple(x.shape))
            return x + (t + 100 * labels)[:, None, None, None]

    x = torch.randn(2, 3, 13, 21)
    out = TiledNet(Spy(), 8, chunk=5)(x, torch.tensor([10.0, 20.0]), torch.tensor([1, 2]))
    # weights normalised and every tile given its own
    # image's t and label: the pixelwise answer exactly
    assert torch.allclose(out, x + torch.tensor([110.0, 220.0])[:, None, None, None], atol=1e-4)
    tiles = len(tile_starts(13, 8, 2)) * len(tile_starts(21, 8, 2))
    # only whole tiles, in chunks
    assert all(shape[1:] == (3, 8, 8) and shape[0] <= 5 for shape in calls)
    assert sum(shape[0] for shape in calls) == 2 * tiles


def test_a_large_image_is_denoised_tile_by_tile_exactly_as_the_exact_denoiser_would():
    """The exact Gaussian denoiser works pixel by pixel, so tiling must not change its answer: a
    20x13 image through 8x8 tiles gives the posterior mean of every pixel."""
    mu, sd, sigma = 0.1, 0.4, 0.1
    run = _gaussian_run(mu, sd, size=8)
    g = torch.Generator().manual_seed(0)
    x = (mu + sd * torch.randn(4, 1, 13, 20, generator=g)).clamp(-1, 1)
    y = x + 2 * sigma * torch.randn(x.shape, generator=g)
    noisy = to_uint8_images(y)
    out = denoise(run, noisy, sigma, clip_x0=False)
    y_model = noisy.float() / 127.5 - 1  # what the model sees: y rounded to uint8
    s2 = (2 * sigma) ** 2
    # E[x | y] for x ~ N(mu, sd^2), y = x + 2 sigma n
    expected = mu + sd**2 / (sd**2 + s2) * (y_model - mu)
    assert out.shape == noisy.shape
    assert (out.float() - ((expected + 1) * 127.5).round().clamp(0, 255)).abs().max() <= 1


def to_uint8_images(x):
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def test_a_folder_of_mixed_sizes_is_restored_at_each_image_size(tiny_run, tmp_path):
    rng = np.random.default_rng(3)
    shapes = {"a.png": (8, 8), "b.png": (12, 20), "c.png": (8, 8), "d.png": (12, 20),
              "e.png": (9, 8)}
    _write_pngs(tmp_path / "in", [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes.values()],
                list(shapes))
    import copy

    calls = []

    class Recording(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, labels=None):
            calls.append(tuple(x.shape))
            return self.net(x, t)

    run = copy.copy(tiny_run)
    run.net = Recording(tiny_run.net)
    out = restore_folder(run, "denoise", tmp_path / "in", tmp_path / "out", sigma=0.1, batch_size=2,
                         log=lambda *a: None)
    for name, (h, w) in shapes.items():
        assert read_image(out / "individual" / name).shape == (1, h, w)
    # --batch-size bounds the tiles per call too
    assert all(shape[0] <= 2 and shape[2:] == (8, 8) for shape in calls)
    # a, c whole; b, d in 2 x 3 tiles; e in 2 x 1
    assert sum(shape[0] for shape in calls) == 2 + 2 * 2 * 3 + 2
    assert read_image(out / "grid.png").shape[0] == 1
    # (mmse, no noise) an image's result does not depend on the images batched with it
    alone = tmp_path / "alone"
    _write_pngs(alone, [np.asarray(Image.open(tmp_path / "in" / "d.png"))], ["d.png"])
    restore_folder(tiny_run, "denoise", alone, tmp_path / "out_alone", sigma=0.1,
                   log=lambda *a: None)
    assert torch.equal(read_image(tmp_path / "out_alone" / "individual" / "d.png"),
                       read_image(out / "individual" / "d.png"))


def test_an_images_noise_follows_its_name_not_its_neighbours(tiny_run, tmp_path):
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)]
    _write_pngs(tmp_path / "all", images, ["a.png", "b.png", "c.png"])
    _write_pngs(tmp_path / "one", images[2:], ["c.png"])
    outputs = {}
    for folder in ("all", "one"):
        restore_folder(tiny_run, "img2img", tmp_path / folder, tmp_path / f"out_{folder}",
                       strength=0.6, sampler="ddpm", steps=5, seed=2, batch_size=1,
                       log=lambda *a: None)
        outputs[folder] = {p.name: read_image(p)
                           for p in (tmp_path / f"out_{folder}" / "individual").iterdir()}
    assert torch.equal(outputs["all"]["c.png"], outputs["one"]["c.png"])
    assert not torch.equal(outputs["all"]["a.png"], outputs["all"]["b.png"])


def test_a_mask_is_white_above_mid_gray_and_transparency_is_laid_on_black(tmp_path):
    from ddpmkit.pixels import read_mask

    square = np.zeros((8, 8), bool)
    square[2:6, 2:6] = True
    stroke = np.full((8, 8, 4), 255, np.uint8)  # white everywhere, the shape in the alpha alone
    stroke[..., 3] = square * 255
    Image.fromarray(stroke, "RGBA").save(tmp_path / "stroke.png")
    Image.fromarray(np.where(square, 200, 100).astype(np.uint8)).save(tmp_path / "gray.png")
    # 16-bit: mid-gray of 65535, whatever the largest value (1000 is near black, not white)
    Image.fromarray(np.where(square, 50000, 1000).astype(np.uint16)).save(tmp_path / "wide.png")
    for name in ("stroke.png", "gray.png", "wide.png"):
        assert torch.equal(read_mask(tmp_path / name)[0], torch.from_numpy(square)), name
    Image.fromarray(np.where(square, 1000, 0).astype(np.uint16)).save(tmp_path / "dark.png")
    assert not read_mask(tmp_path / "dark.png").any()


def test_img2img_records_the_steps_it_ran(tiny_run, tmp_path):
    """At strength 0.1 of 100 timesteps, t = 9.9 and the 10 integers below it are all there is:
    asking for 5,000 steps runs those 11, and the manifest says so; asking for 40 is one job."""
    _write_pngs(tmp_path / "in", [np.full((8, 8), 90, np.uint8)], ["a.png"])
    out = restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "out", strength=0.1,
                         steps=5000, log=lambda *a: None)
    with open(out / "manifest.csv") as f:
        assert json.loads(next(csv.DictReader(f))["parameters"])["steps"] == 11
    restore_folder(tiny_run, "img2img", tmp_path / "in", out, strength=0.1, steps=40,
                   log=lambda *a: None)  # not refused as another job
    # inpainting and denoise sampling: at most the schedule's 100 steps, recorded as run
    masks = tmp_path / "masks"
    _write_pngs(masks, [np.full((8, 8), 255, np.uint8)], ["a.png"])
    for kind, options in (("inpaint", {"masks_dir": masks, "resamplings": 1}),
                          ("denoise", {"method": "sample", "sigma": 0.3})):
        out = tmp_path / kind
        restore_folder(tiny_run, kind, tmp_path / "in", out, steps=5000, log=lambda *a: None,
                       **options)
        with open(out / "manifest.csv") as f:
            assert json.loads(next(csv.DictReader(f))["parameters"])["steps"] == 100, kind
        restore_folder(tiny_run, kind, tmp_path / "in", out, steps=100, log=lambda *a: None,
                       **options)  # the same job


def test_restoration_keeps_the_runs_clipping_choice(tiny_run, tmp_path):
    import dataclasses

    _write_pngs(tmp_path / "in", [np.full((8, 8), 90, np.uint8)], ["a.png"])
    unclipped = dataclasses.replace(tiny_run,
                                    config=updated(tiny_run.config, {"sample.clip_x0": False}))
    for run, clipped in ((tiny_run, True), (unclipped, False)):
        out = restore_folder(run, "img2img", tmp_path / "in", tmp_path / f"out{clipped}",
                             steps=3, log=lambda *a: None)
        with open(out / "manifest.csv") as f:
            assert json.loads(next(csv.DictReader(f))["parameters"])["clip_x0"] is clipped


def test_a_flat_image_reads_as_clean_and_gets_the_smallest_level(tiny_run, tmp_path):
    black = np.zeros((1, 1, 8, 8), np.uint8)
    red = np.zeros((1, 3, 16, 16), np.uint8)
    red[:, 0] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mean of empty slice" either
        assert estimate_sigma(black) == [0.0]
        assert estimate_sigma(red) == [pytest.approx(0.0, abs=1e-12)]
    _write_pngs(tmp_path / "in", [np.zeros((8, 8), np.uint8)], ["black.png"])
    said = []
    out = restore_folder(tiny_run, "denoise", tmp_path / "in", tmp_path / "out", sigma="auto",
                         log=said.append)
    with open(out / "manifest.csv") as f:
        assert float(next(csv.DictReader(f))["sigma"]) == pytest.approx(
            sigma_range(tiny_run.schedule)[0], rel=1e-5)
    assert any(m.startswith("denoise: note: 1 image(s) look cleaner than the least noise")
               for m in said), said


def test_a_rerun_restores_only_what_an_interrupted_run_left(tiny_run, tmp_path, monkeypatch):
    import ddpmkit.restoration as restoration

    rng = np.random.default_rng(5)
    names = ["a.png", "b.png", "c.png"]
    _write_pngs(tmp_path / "in", [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in names],
                names)
    whole = restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "whole", steps=3,
                           batch_size=1, log=lambda *a: None)
    real_png, written = restoration.png_bytes, []

    def dies_after_two(img, text=None):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(1)
        return real_png(img, text)

    monkeypatch.setattr(restoration, "png_bytes", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "out", steps=3,
                       batch_size=1, log=lambda *a: None)
    monkeypatch.setattr(restoration, "png_bytes", real_png)
    restored, real_run_on = [], restoration.Restoration.run_on
    monkeypatch.setattr(restoration.Restoration, "run_on", lambda self, run, batch, *a:
                        restored.append(len(batch)) or real_run_on(self, run, batch, *a))
    said = []
    restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "out", steps=3, batch_size=1,
                   log=said.append)
    assert restored == [1]  # the one image the interrupted run had not written
    assert f"resuming: 2 of 3 images already in {tmp_path / 'out'}" in said
    for name in ["grid.png", "manifest.csv", *(f"individual/{n}" for n in names)]:
        assert (tmp_path / "out" / name).read_bytes() == (whole / name).read_bytes(), name
    # an output of another shape than its input (replaced by hand) is made again, not shown
    Image.new("RGB", (3, 3), (255, 0, 0)).save(tmp_path / "out" / "individual" / "a.png")
    restored.clear()
    restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "out", steps=3, batch_size=1,
                   log=lambda *a: None)
    assert restored == [1]
    for name in ["grid.png", "manifest.csv", *(f"individual/{n}" for n in names)]:
        assert (tmp_path / "out" / name).read_bytes() == (whole / name).read_bytes(), name


def test_an_input_changed_since_the_last_run_is_not_taken_for_done(tiny_run, tmp_path):
    """The record holds the inputs' pixels, not only their names: a rerun after an input changed
    is another job (refused, or redone with fresh), never the old output under the new input."""
    rng = np.random.default_rng(6)
    _write_pngs(tmp_path / "in", [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in "ab"],
                ["a.png", "b.png"])
    restore = partial(restore_folder, tiny_run, "img2img", tmp_path / "in", tmp_path / "out",
                      steps=3, log=lambda *a: None)
    before = restore()
    old = (before / "individual" / "a.png").read_bytes()
    _write_pngs(tmp_path / "in", [np.zeros((8, 8), dtype=np.uint8)], ["a.png"])
    with pytest.raises(UserError, match=r"another restoration \(files: 1 differ \('a.png'\)\)"):
        restore()
    assert (before / "individual" / "a.png").read_bytes() == old
    restore(fresh=True)
    again = restore_folder(tiny_run, "img2img", tmp_path / "in", tmp_path / "new", steps=3,
                           log=lambda *a: None)
    assert (before / "individual" / "a.png").read_bytes() == (
        again / "individual" / "a.png").read_bytes() != old


def test_a_file_name_that_is_not_utf8_is_refused_before_anything_is_written(tiny_run, tmp_path):
    import os

    folder = tmp_path / "in"
    _write_pngs(folder, [np.full((8, 8), 90, np.uint8)], ["x.png"])
    (folder / "x.png").rename(folder / os.fsdecode(b"bad\xff.png"))
    with pytest.raises(UserError, match="this path is not valid UTF-8: rename it"):
        restore_folder(tiny_run, "img2img", folder, tmp_path / "out", steps=2)
    assert not (tmp_path / "out").exists()


def test_hidden_files_in_the_input_folder_are_not_inputs(tiny_run, tmp_path):
    """A folder copied from a Mac holds ._x.png beside x.png; tools leave .cache.png: skipped, as
    the data folders' are."""
    folder = tmp_path / "in"
    _write_pngs(folder, [np.full((8, 8), 90, np.uint8)] * 2, ["x.png", ".cache.png"])
    (folder / "._x.png").write_bytes(b"\x00\x05\x16\x07junk")  # AppleDouble, no image
    out = restore_folder(tiny_run, "denoise", folder, tmp_path / "out", sigma=0.1,
                         log=lambda *a: None)
    assert sorted(p.name for p in (out / "individual").iterdir()) == ["x.png"]


def test_a_transparent_mask_is_turned_upright_as_an_opaque_one_is(tmp_path):
    from ddpmkit.pixels import read_mask

    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees
    gray = np.zeros((8, 8), np.uint8)
    gray[:2, :4] = 255
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:2, :4] = 255
    Image.fromarray(gray).save(tmp_path / "gray.png", exif=exif)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png", exif=exif)
    upright = torch.from_numpy(np.rot90(gray, 2) > 127)
    for name in ("gray.png", "rgba.png"):
        assert torch.equal(read_mask(tmp_path / name)[0], upright), name


def test_a_missing_mask_names_each_expected_file_once(tmp_path):
    from ddpmkit.restoration import load_masks

    (tmp_path / "m").mkdir()
    image = torch.zeros(1, 8, 8, dtype=torch.uint8)
    for name, expected in (("b.png", "b.png"), ("a.jpg", "a.jpg or a.png")):
        with pytest.raises(UserError) as caught:
            load_masks(tmp_path / "m", [tmp_path / name], [image])
        assert str(caught.value).endswith(f"(expected {expected})")
    (tmp_path / "m" / "b.png").write_bytes(b"")  # one mask file given for the folder
    with pytest.raises(UserError, match="is a file: give the folder of masks"):
        load_masks(tmp_path / "m" / "b.png", [tmp_path / "b.png"], [image])
