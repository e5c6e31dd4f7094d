"""diffusers interop: configs, weights, samplers and folders, checked against diffusers itself.

Tests that need diffusers skip without it; the models are built locally with random weights.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import shutil
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ddpmkit.checkpoint import save_checkpoint
from ddpmkit.config import load_config
from ddpmkit.errors import UserError
from ddpmkit.generation import sample
from ddpmkit.images import to_uint8
from ddpmkit.diffusers_format import (
    CLASS_NAMES_FILE,
    SCHEDULER_DEFAULTS,
    UNET_DEFAULTS,
    ddpmkit_to_diffusers_config,
    ddpmkit_to_diffusers_state_dict,
    diffusers_config_to_ddpmkit,
    diffusers_to_ddpmkit_state_dict,
    read_diffusers,
)
from ddpmkit.interop import export_diffusers, import_diffusers
from ddpmkit.run import RunDir, load_run
from ddpmkit.samplers import Denoiser, ddim, ddpm, dpmpp_2m, euler, make_timesteps
from ddpmkit.schedule import Schedule, cosine_betas
from ddpmkit.unet import UNet, count_parameters

# google/ddpm-cifar10-32's unet/config.json, as published
# (keys absent there take diffusers' defaults).
CIFAR = {"act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
         "center_input_sample": False,
         "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
         "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
         "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
         "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
         "time_embedding_type": "positional",
         "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
# Grayscale and small (1000 sampling steps take seconds), two heads of 16 at 16x16,
# diffusers' own embedding order (flip_sin_to_cos, freq_shift 0).
GRAY = {"sample_size": 32, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
        "block_out_channels": [16, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 16,
        "norm_num_groups": 8, "norm_eps": 1e-6, "downsample_padding": 0}
# Class-conditional, three levels, attention at the top resolution only.
COND = {"sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"], "attention_head_dim": 8,
        "norm_num_groups": 16, "downsample_padding": 0, "num_class_embeds": 10}
ARCHS = {"cifar10": CIFAR, "gray": GRAY, "cond": COND}


@pytest.fixture(autouse=True)
def _one_thread(_threads):
    """After conftest's 2 threads: one. These networks are small or run a few steps, and on a busy
    2-core machine two threads oversubscribe the cores and run ~10x slower (measured: 40 s vs 4 s
    for the CIFAR-10 DDIM test)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def randomized(model):
    """Random norms and biases too (they start at 1
    and 0), so a swapped tensor changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


_models = {}


def diffusers_model(name):
    """(UNet2DModel with random weights, the same network
    as ours, our Config); built once per name."""
    if name not in _models:
        from diffusers import UNet2DModel

        torch.manual_seed(0)
        theirs = randomized(UNet2DModel(**ARCHS[name]))
        cfg = diffusers_config_to_ddpmkit(dict(theirs.config))
        ours = UNet(cfg.model, cfg.data.image_size).eval().requires_grad_(False)
        ours.load_state_dict(diffusers_to_ddpmkit_state_dict(theirs.state_dict(), cfg))
        _models[name] = theirs, ours, cfg
    return _models[name]


def plain(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items()
            if not k.startswith("_")}


def test_defaults_are_diffusers_own(diffusers):
    """A key missing from a config.json means diffusers' default: ours must be the same table."""
    for cls, table in ((diffusers.UNet2DModel, UNET_DEFAULTS),
                       (diffusers.DDPMScheduler, SCHEDULER_DEFAULTS)):
        params = inspect.signature(cls.__init__).parameters
        defaults = {k: list(p.default) if isinstance(p.default, tuple) else p.default
                    for k, p in params.items() if k != "self"}
        assert defaults == table


@pytest.mark.parametrize("name", ["cifar10", "gray", "cond"])
def test_weights_round_trip_exactly_and_outputs_agree(diffusers, name):
    theirs, ours, cfg = diffusers_model(name)
    if name == "cifar10":
        assert count_parameters(theirs) == count_parameters(ours) == 35_746_307
        assert cfg.model.attention_resolutions == [16] and cfg.model.channel_mult == [1, 2, 2, 2]
    reference = theirs.state_dict()
    back = ddpmkit_to_diffusers_state_dict(ours.state_dict(), cfg)
    assert back.keys() == reference.keys()
    assert all(torch.equal(back[k], reference[k]) for k in reference)
    # and the config: ours written back is the model's own config, key for key
    assert plain(ddpmkit_to_diffusers_config(cfg)[0]) == plain(theirs.config)

    g = torch.Generator().manual_seed(1)
    c, s = cfg.model.in_channels, cfg.data.image_size
    x, t = torch.randn(2, c, s, s, generator=g), torch.tensor([3, 700])
    labels = torch.tensor([0, 9]) if cfg.model.num_classes else None
    with torch.no_grad():
        a, b = ours(x, t, labels), theirs(x, t, class_labels=labels).sample
    assert (a - b).abs().max() <= 1e-5


def test_ddpm_1000_steps_matches_diffusers_ddpm_scheduler(diffusers):
    """diffusers' DDPMScheduler.step loop and our ddpm sampler, same start and per-step noise."""
    theirs, ours, cfg = diffusers_model("gray")
    scheduler = diffusers.DDPMScheduler.from_config(ddpmkit_to_diffusers_config(cfg)[1])
    scheduler.set_timesteps(1000)
    shape = (1, 1, 32, 32)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(6)
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(theirs(x, t).sample, t, x, generator=g).prev_sample

    # the same draws in the same order: one per step but the last
    g = torch.Generator().manual_seed(6)
    schedule = Schedule.from_config(cfg.diffusion)
    timesteps = make_timesteps(1000, schedule, "uniform")
    assert timesteps == scheduler.timesteps.tolist()
    y = ddpm(Denoiser(ours, schedule, "eps", clip_x0=True), x_T.clone(), timesteps,
             lambda: torch.randn(shape, generator=g), variance="small")
    assert (to_uint8(x).int() - to_uint8(y).int()).abs().max() <= 1


def test_ddim_10_steps_cifar10_matches_diffusers_ddim_scheduler(diffusers):
    """DDIM agrees with diffusers' DDIMScheduler with timestep_spacing "trailing" (= our "trailing":
    999, 899, ..., 99), set_alpha_to_one=True (the step after the last goes to abar = 1, the clean
    image, as ours does) and step(use_clipped_model_output=True) (eps recomputed from the clipped
    x0, as our Denoiser does). "linspace" is not equivalent: diffusers steps from t to
    t - T // steps, not to the next timestep in its list; "leading" has no counterpart among our
    spacings."""
    theirs, ours, cfg = diffusers_model("cifar10")
    scheduler = diffusers.DDIMScheduler.from_config(ddpmkit_to_diffusers_config(cfg)[1],
                                                    timestep_spacing="trailing",
                                                    set_alpha_to_one=True)
    scheduler.set_timesteps(10)
    schedule = Schedule.from_config(cfg.diffusion)
    timesteps = make_timesteps(10, schedule, "trailing")
    assert timesteps == scheduler.timesteps.tolist()
    x_T = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(7))
    x = x_T.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(theirs(x, t).sample, t, x, eta=0.0,
                               use_clipped_model_output=True).prev_sample
    y = ddim(Denoiser(ours, schedule, "eps", clip_x0=True), x_T.clone(), timesteps, lambda: None,
             eta=0.0)
    assert (to_uint8(x).int() - to_uint8(y).int()).abs().max() <= 1


DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# diffusers' set_timesteps, numpy 2
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_2m_10_steps_matches_diffusers_dpm_solver_multistep_scheduler(diffusers, prediction):
    """DPM-Solver++(2M) agrees with diffusers' DPMSolverMultistepScheduler (algorithm_type
    "dpmsolver++", solver_order 2, solver_type "midpoint", timestep_spacing "trailing" = our
    "trailing") to float32 rounding. Clipping: that scheduler has no clip_sample, but
    thresholding=True with sample_max_value=1.0 clamps its dynamic threshold s to exactly 1, i.e.
    clips x0 to [-1, 1] like our Denoiser's clip_x0 (DPM-Solver++ uses only x0, so our eps
    recomputed from the clipped x0 plays no part); it keeps the output in [-1, 1]. Order: both take
    a first-order first step and second-order steps after it; both take the last step into sigma = 0
    (abar = 1) as x = x0 (diffusers' first-order update there, forced by final_sigmas_type "zero",
    is exactly x0). Ours also steps first-order into t=0 when the spacing reaches it; trailing stops
    at T/steps - 1 = 99, so it never does. diffusers' lower_order_final (fewer than 15 steps) lowers
    the last step, first-order already, and third order to second on the step before: with
    solver_order 2 True and False run the same algorithm, checked below."""
    theirs, ours, cfg = diffusers_model("gray")
    schedule = Schedule.from_config(cfg.diffusion)
    timesteps = make_timesteps(10, schedule, "trailing")
    x_T = torch.randn((2, 1, 32, 32), generator=torch.Generator().manual_seed(8))

    def diffusers_sample(lower_order_final):
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            ddpmkit_to_diffusers_config(cfg)[1], algorithm_type="dpmsolver++", solver_order=2,
            solver_type="midpoint", timestep_spacing="trailing",
            lower_order_final=lower_order_final, final_sigmas_type="zero",
            prediction_type=DIFFUSERS_PREDICTION[prediction], thresholding=True,
            sample_max_value=1.0)
        scheduler.set_timesteps(10)
        assert timesteps == scheduler.timesteps.tolist()
        x = x_T.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(theirs(x, t).sample, t, x).prev_sample
        return x

    x = diffusers_sample(lower_order_final=True)
    assert torch.equal(x, diffusers_sample(lower_order_final=False))
    y = dpmpp_2m(Denoiser(ours, schedule, prediction, clip_x0=True), x_T.clone(), timesteps,
                 lambda: None)
    assert y.abs().max() <= 1
    # Measured 1e-6 (v) to 4e-5 (eps, over seeds): float32 steps against our float64 coefficients,
    # and diffusers' float32 sigma table; eps's x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
    # multiplies rounding by 1 / sqrt(abar) = 157 at t = 999. An update coefficient 1% off moves
    # it by 2e-3 or more.
    assert (x - y).abs().max() <= 1e-4


# diffusers' set_timesteps, numpy 2
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_euler_10_steps_matches_diffusers_euler_discrete_scheduler(diffusers, prediction):
    """Euler agrees with diffusers' EulerDiscreteScheduler (timestep_spacing "trailing" = our
    "trailing", sigmas to 0, no churn) to float32 rounding. Both step x_ve = x / sqrt(abar) along
    (x_ve - x0) / sigma, and diffusers' scale_model_input (x_ve / sqrt(sigma^2 + 1)) hands the
    network the same x_t as our Denoiser. Two conventions are matched by hand: (1) clipping:
    diffusers' Euler never clips x0, so ours runs with clip_x0=False; (2) the start: ours maps x_T
    to x_ve exactly, x_T * sqrt(1 + sigma_max^2), while diffusers' init_noise_sigma with trailing
    spacing is sigma_max (x_T * 157.4073 instead of * 157.4105 here), so diffusers starts from our
    x_ve. From its own init_noise_sigma it ends 1.3e-5 to 2e-5 off, relative to the output's size:
    above the bound below, which tells the two conventions apart."""
    theirs, ours, cfg = diffusers_model("gray")
    scheduler = diffusers.EulerDiscreteScheduler.from_config(
        ddpmkit_to_diffusers_config(cfg)[1], timestep_spacing="trailing",
        interpolation_type="linear", final_sigmas_type="zero",
        prediction_type=DIFFUSERS_PREDICTION[prediction])
    scheduler.set_timesteps(10)
    schedule = Schedule.from_config(cfg.diffusion)
    timesteps = make_timesteps(10, schedule, "trailing")
    assert timesteps == scheduler.timesteps.tolist()
    x_T = torch.randn((2, 1, 32, 32), generator=torch.Generator().manual_seed(8))
    x = x_T * (scheduler.sigmas[0] ** 2 + 1) ** 0.5
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(theirs(scheduler.scale_model_input(x, t), t).sample,
                               t, x).prev_sample
    y = euler(Denoiser(ours, schedule, prediction, clip_x0=False), x_T.clone(), timesteps,
              lambda: None)
    # Unclipped, a random network's eps is no estimate of the noise in x_T and
    # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) reaches hundreds (1 / sqrt(abar) = 157 at
    # t = 999); v and x0 stay within a few units. So the bound is relative to the output's size:
    # measured 3e-7 (eps) and 1e-6 (v), float32 rounding.
    scale = max(1.0, x.abs().max().item())
    assert (x - y).abs().max() <= 4e-6 * scale


def test_cosine_schedule_is_diffusers_squaredcos_cap_v2(diffusers):
    betas = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas  # float32
    assert torch.equal(torch.from_numpy(cosine_betas(1000)).float(), betas)
    cfg = diffusers_config_to_ddpmkit(GRAY, {"beta_schedule": "squaredcos_cap_v2"})
    assert cfg.diffusion.schedule == "cosine"
    assert ddpmkit_to_diffusers_config(cfg)[1]["beta_schedule"] == "squaredcos_cap_v2"


def test_trained_betas_are_kept_only_when_they_are_one_of_ours():
    linear = np.linspace(1e-4, 0.02, 100).astype(np.float32).tolist()
    cfg = diffusers_config_to_ddpmkit(GRAY, {"trained_betas": linear})
    assert cfg.diffusion.schedule == "linear" and cfg.diffusion.num_timesteps == 100
    with pytest.raises(UserError, match="trained_betas"):
        diffusers_config_to_ddpmkit(GRAY, {"trained_betas": [0.01] * 100})


def test_scheduler_options_map_to_ours():
    cfg = diffusers_config_to_ddpmkit(GRAY, {"_class_name": "DDPMScheduler",
                                             "prediction_type": "v_prediction",
                                             "variance_type": "fixed_large", "clip_sample": False,
                                             "num_train_timesteps": 500, "beta_end": 0.03})
    assert ((cfg.diffusion.prediction, cfg.sample.variance, cfg.sample.clip_x0)
            == ("v", "large", False))
    assert (cfg.diffusion.num_timesteps, cfg.diffusion.beta_end) == (500, 0.03)
    assert (diffusers_config_to_ddpmkit(GRAY, {"prediction_type": "sample"}).diffusion.prediction
            == "x0")
    assert (diffusers_config_to_ddpmkit(GRAY, {"variance_type": "fixed_small_log"}).sample.variance
            == "small")
    # DPMSolverMultistepScheduler's default: no learned variance
    dpm = diffusers_config_to_ddpmkit(GRAY, {"_class_name": "DPMSolverMultistepScheduler",
                                             "variance_type": None, "beta_end": 0.03})
    assert (dpm.sample.variance, dpm.diffusion.beta_end) == ("small", 0.03)
    # diffusers sizes a "learned" time embedding with
    # it and ignores it for "positional": harmless here
    assert (diffusers_config_to_ddpmkit({**GRAY, "num_train_timesteps": 1000}).model.base_channels
            == 16)


@pytest.mark.parametrize("change, key", [
    ({"time_embedding_type": "fourier"}, "time_embedding_type"),
    ({"downsample_padding": 1}, "downsample_padding"),
    ({"downsample_padding": None}, "downsample_padding"),  # left out: diffusers' default, 1
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"center_input_sample": True}, "center_input_sample"),
    ({"add_attention": False}, "add_attention"),
    ({"mid_block_type": None}, "mid_block_type"),
    ({"mid_block_scale_factor": 2}, "mid_block_scale_factor"),
    ({"upsample_type": "resnet"}, "upsample_type"),
    ({"downsample_type": "resnet"}, "downsample_type"),
    ({"attn_norm_num_groups": 4}, "attn_norm_num_groups"),
    ({"time_embedding_dim": 100}, "time_embedding_dim"),
    ({"out_channels": 3}, "out_channels"),
    ({"sample_size": [32, 16]}, "sample_size"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "down_block_types"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D"]}, "mirrored"),
    ({"block_out_channels": [32, 48]}, "block_out_channels"),
    ({"attention_head_dim": 24}, "attention_head_dim"),
    # crafted: values of the wrong type or beyond any model, each one line, never a traceback
    ({"block_out_channels": 32}, "block_out_channels"),
    ({"attention_head_dim": 0}, "attention_head_dim"),
    ({"num_class_embeds": 10**12}, "num_class_embeds"),
    ({"down_block_types": [["x"], "DownBlock2D"]}, "down_block_types"),
    ({"layers_per_block": 10**9}, "model.num_res_blocks: 1,000,000,000 is more than"),
    ({"sample_size": 10**12}, "data.image_size: 1,000,000,000,000 is more than"),
    # named by the option the user wrote, not by another one or by ddpmkit's key alone
    ({"in_channels": "x", "out_channels": 3}, "option in_channels=.x. is not supported"),
    ({"in_channels": 0, "out_channels": 0}, "option in_channels=0 is not supported"),
    ({"layers_per_block": 0}, "option layers_per_block, read as config key model.num_res_blocks: "
                              "must be positive"),
])
def test_unsupported_unet_options_are_refused(change, key):
    config = {**GRAY, **change}
    if change.get("downsample_padding", 0) is None:
        del config["downsample_padding"]
    with pytest.raises(UserError, match=key):
        diffusers_config_to_ddpmkit(config)


@pytest.mark.parametrize("change, key", [
    ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
    ({"thresholding": True}, "thresholding"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"variance_type": "fixed_large_log"}, "variance_type"),
    ({"clip_sample_range": 2.0}, "clip_sample_range"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"prediction_type": ["v_prediction"]}, "prediction_type"),
    ({"beta_schedule": {"linear": 1}}, "beta_schedule"),
    ({"trained_betas": "abc"}, "trained_betas"),
    ({"trained_betas": [[0.1, 0.2]]}, "trained_betas"),
    ({"clip_sample": "false"}, "option clip_sample=.false. is not supported"),
])
def test_unsupported_scheduler_options_are_refused(change, key):
    with pytest.raises(UserError, match=key):
        diffusers_config_to_ddpmkit(GRAY, change)


def test_import_pipeline_and_bare_unet_folders_then_sample(diffusers, tmp_path):
    theirs, _, _ = diffusers_model("gray")
    scheduler = diffusers.DDPMScheduler(prediction_type="v_prediction", variance_type="fixed_large")
    diffusers.DDPMPipeline(unet=theirs, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    assert (import_diffusers(tmp_path / "pipe", tmp_path / "run", log=lambda m: None)
            == tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert (run.config.diffusion.prediction, run.config.sample.variance) == ("v", "large")
    reference = theirs.state_dict()
    back = ddpmkit_to_diffusers_state_dict(run.net.state_dict(), run.config)
    assert all(torch.equal(back[k], reference[k]) for k in reference)
    assert load_run(tmp_path / "run", ema=False).step == 0
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["imported_from"] == str((tmp_path / "pipe").resolve())
    images = sample(run, num=2, sampler="ddim", steps=3)
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.uint8

    cfg, net, provenance = read_diffusers(tmp_path / "pipe", log=lambda m: None)  # in memory only
    assert (cfg.model == run.config.model
            and provenance["diffusers_unet_config"]["_class_name"] == "UNet2DModel")
    assert all(torch.equal(v, run.net.state_dict()[k]) for k, v in net.state_dict().items())

    theirs.save_pretrained(tmp_path / "bare")  # no scheduler: DDPM defaults, with a note
    notes = []
    import_diffusers(str(tmp_path / "bare"), tmp_path / "run2", log=notes.append)
    assert any("no scheduler config" in n for n in notes)
    run2 = load_run(tmp_path / "run2")
    assert run2.config.diffusion.prediction == "eps" and run2.config.diffusion.num_timesteps == 1000
    assert sample(run2, num=1, sampler="ddpm", steps=2).shape == (1, 1, 32, 32)
    assert not list(tmp_path.glob(".*partial"))


def test_import_old_attention_names_and_refuse_pickled_weights(diffusers, tmp_path):
    theirs, ours, _ = diffusers_model("cond")
    theirs.save_config(tmp_path / "old")
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
                 ".to_out.0.": ".proj_attn."}
    weights = {}
    for name, tensor in theirs.state_dict().items():
        for new, old in old_names.items():
            name = name.replace(new, old)
        weights[name] = tensor.half()  # stored in fp16: widened exactly on import
    assert any(".query." in k for k in weights)
    # a pickle: refused, never loaded
    torch.save(weights, tmp_path / "old" / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match="diffusion_pytorch_model.bin is a pickle, which ddpmkit "
                                        "never loads: if you trust it, convert it with diffusers"):
        import_diffusers(tmp_path / "old", tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()
    save_file(weights, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    import_diffusers(tmp_path / "old", tmp_path / "run", log=lambda m: None)
    net = load_run(tmp_path / "run").net
    assert net.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k].half().float())
               for k, v in net.state_dict().items())
    # weights that are not finite floats: refused, not imported to sample NaN
    size = weights["conv_in.bias"].shape
    for bad in (torch.full(size, float("nan")), torch.zeros(size, dtype=torch.int32)):
        save_file({**weights, "conv_in.bias": bad},
                  str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(UserError, match="tensor conv_in.bias is not finite floating-point"):
            import_diffusers(tmp_path / "old", tmp_path / "run2", log=lambda m: None)


def test_import_refuses_bad_sources_and_existing_output(tmp_path, monkeypatch):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps({**GRAY, "time_embedding_type": "fourier"}))
    with pytest.raises(UserError, match="time_embedding_type"):
        import_diffusers(tmp_path, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()

    (tmp_path / "unet" / "config.json").write_text(json.dumps(GRAY))
    with pytest.raises(UserError, match="no diffusion_pytorch_model"):
        import_diffusers(tmp_path, tmp_path / "out", log=lambda m: None)

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        import_diffusers(tmp_path, tmp_path / "full", log=lambda m: None)

    with pytest.raises(UserError, match="no such folder"):
        import_diffusers(str(tmp_path / "missing" / "deeper" / "still"), tmp_path / "out",
                         log=lambda m: None)
    # runs/typo looks like a hub id, but runs/ is a folder here: a mistyped path, never downloaded
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="runs/typo: no such folder"):
        import_diffusers("runs/typo", tmp_path / "out", log=lambda m: None)

    # a latent pipeline's UNet would import and sample noise; an unreadable index is not skipped
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
        "vqvae": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    with pytest.raises(UserError, match="model_index.json describes LDMPipeline with a vqvae: "
                                        "ddpmkit imports pixel-space DDPM pipelines"):
        import_diffusers(tmp_path, tmp_path / "out", log=lambda m: None)
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": []}))  # not an IndexError
    with pytest.raises(UserError, match="describes a pipeline with a nameless unet"):
        import_diffusers(tmp_path, tmp_path / "out", log=lambda m: None)
    (tmp_path / "model_index.json").write_text("{broken")
    with pytest.raises(UserError, match="cannot read .*model_index.json"):
        import_diffusers(tmp_path, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()
    # a config that is there but cannot be read (a dangling link of a half-downloaded cache, a
    # pipe) is refused, never taken for none (and the defaults: linear betas, eps)
    (tmp_path / "model_index.json").unlink()
    (tmp_path / "model_index.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(UserError, match="cannot read .*model_index.json"):
        import_diffusers(tmp_path, tmp_path / "out", log=lambda m: None)
    (tmp_path / "model_index.json").unlink()
    (tmp_path / "scheduler").mkdir()
    os.mkfifo(tmp_path / "scheduler" / "scheduler_config.json")
    with pytest.raises(UserError, match="cannot read .*scheduler_config.json"):
        import_diffusers(tmp_path, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_hub_id_without_network_or_huggingface_hub_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "google/ddpm-cifar10-32" must not exist as a local folder
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("offline: no network")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="download it on a machine with network") as refused:
        import_diffusers("google/ddpm-cifar10-32", tmp_path / "out", log=lambda m: None)
    # the command it names is the one huggingface_hub installs
    command = str(refused.value).split("with network (")[1].split()[0]
    assert shutil.which(command, path=str(Path(sys.executable).parent)), command
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(UserError, match="huggingface_hub is not installed"):
        import_diffusers("google/ddpm-cifar10-32", tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def make_run(path, num_classes):
    """A ddpmkit run folder as training writes it, with
    random weights (EMA different from the model)."""
    cfg = load_config(None, {"model.in_channels": 3, "data.image_size": 16,
                             "model.base_channels": 16, "model.norm_groups": 8,
                             "model.channel_mult": [1, 2], "model.num_res_blocks": 1,
                             "model.attention_resolutions": [8], "model.attention_head_dim": 8,
                             "model.num_classes": num_classes,
                             "model.class_conditional": num_classes > 0,
                             "data.class_names": [str(i) for i in range(num_classes)] or None,
                             "diffusion.num_timesteps": 100,
                             "diffusion.prediction": "v", "train.out_dir": str(path)})
    torch.manual_seed(3)
    model = randomized(UNet(cfg.model, 16))
    ema = randomized(copy.deepcopy(model))
    run = RunDir(path)
    run.start(cfg, {}, step=0)
    sha = save_checkpoint(run.checkpoint_file(7), model, ema, None, 7)
    run.add_checkpoint(sha, 7, 0.1, keep_last=1)
    return cfg, ema


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_export_loads_in_diffusers_without_warnings_and_imports_back_exactly(
        diffusers, tmp_path, num_classes):
    cfg, ema = make_run(tmp_path / "run", num_classes)
    notes = []
    out = export_diffusers(tmp_path / "run", tmp_path / "export", log=notes.append)
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert any("class labels" in n for n in notes) == bool(num_classes)

    records = _Records()
    # diffusers' own handler does not propagate: listen here
    logger = logging.getLogger("diffusers")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # low_cpu_mem_usage=False: without accelerate installed diffusers warns about that,
            # which concerns this environment, not the exported files
            pipe = diffusers.DDPMPipeline.from_pretrained(out, low_cpu_mem_usage=False)
            unet = diffusers.UNet2DModel.from_pretrained(out / "unet", low_cpu_mem_usage=False)
    finally:
        logger.removeHandler(records)
    assert ([str(w.message) for w in caught] == []
            and [r.getMessage() for r in records.records] == [])
    assert isinstance(pipe.scheduler, diffusers.DDPMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 90])
    labels = torch.tensor([0, 2]) if num_classes else None
    with torch.no_grad():
        a = ema(x, t, labels)
        for net in (unet.eval(), pipe.unet.eval()):
            assert (net(x, t, class_labels=labels).sample - a).abs().max() <= 1e-5
    if not num_classes:
        images = pipe(batch_size=1, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (1, 16, 16, 3)

    import_diffusers(out, tmp_path / "back", log=lambda m: None)
    back = load_run(tmp_path / "back")
    # the same resolved model (the preset it was resolved from is not kept) and diffusion process
    assert (back.config.model == dataclasses.replace(cfg.model, preset=None)
            and back.config.diffusion == cfg.diffusion)
    theirs = ema.state_dict()
    assert back.net.state_dict().keys() == theirs.keys()
    assert all(torch.equal(v, theirs[k]) for k, v in back.net.state_dict().items())

    with pytest.raises(UserError, match="not empty"):
        export_diffusers(tmp_path / "run", out, log=lambda m: None)


def test_export_refuses_what_diffusers_cannot_express():
    def config(**model):
        return load_config(None, {"model.in_channels": 1, "data.image_size": 16,
                                  **{f"model.{k}": v for k, v in model.items()}})

    with pytest.raises(UserError, match="channel_mult"):
        ddpmkit_to_diffusers_config(config(channel_mult=[2, 2]))
    # widths 32 (attention at 16) and 96 (mid): ours has
    # 1 head of 32 and 2 heads of 48; diffusers cannot
    with pytest.raises(UserError, match="attention_head_dim"):
        ddpmkit_to_diffusers_config(config(channel_mult=[1, 3], attention_resolutions=[16],
                                           attention_head_dim=48))
    # one full-width head everywhere (96 // 64 = 1) is diffusers' attention_head_dim None
    unet = ddpmkit_to_diffusers_config(config(channel_mult=[1, 3], attention_resolutions=[8],
                                              attention_head_dim=64))[0]
    assert unet["attention_head_dim"] is None


def test_export_and_import_work_without_diffusers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # any import of it would fail
    _, ema = make_run(tmp_path / "run", 0)
    export_diffusers(tmp_path / "run", tmp_path / "export", ema=True, log=lambda m: None)
    import_diffusers(tmp_path / "export", tmp_path / "back", log=lambda m: None)
    net = load_run(tmp_path / "back").net
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in net.state_dict().items())


def test_an_imported_model_refuses_guidance_unless_it_is_known_to_have_dropped_labels(tmp_path):
    make_run(tmp_path / "run", 3)
    export_diffusers(tmp_path / "run", tmp_path / "export", log=lambda m: None)
    import_diffusers(tmp_path / "export", tmp_path / "ours", log=lambda m: None)
    assert RunDir(tmp_path / "ours").config().train.label_dropout == 0.1  # as the export recorded
    (tmp_path / "export" / CLASS_NAMES_FILE).unlink()  # as diffusers' own models come
    notes = []
    import_diffusers(tmp_path / "export", tmp_path / "theirs", log=notes.append)
    assert RunDir(tmp_path / "theirs").config().train.label_dropout == 0
    assert any("sampling refuses guidance other than 1" in n for n in notes)
    # what is unknown is said as unknown, with the way to say it was so
    with pytest.raises(UserError, match="do not say whether labels were dropped in training "
                       r"\(if they were, set train.label_dropout in its config.yaml\)"):
        sample(load_run(tmp_path / "theirs"), num=1, steps=2, guidance=2.0)
    assert sample(load_run(tmp_path / "ours"), num=1, steps=2, guidance=2.0).shape[0] == 1


def test_class_names_that_do_not_fit_the_model_are_refused_on_import(tmp_path):
    make_run(tmp_path / "run", 3)
    export_diffusers(tmp_path / "run", tmp_path / "export", log=lambda m: None)
    names = tmp_path / "export" / CLASS_NAMES_FILE
    assert json.loads(names.read_text()) == {"class_names": ["0", "1", "2"], "label_dropout": 0.1}
    for wrong in (["a", "b"], ["a", "a", "b"], "abc", ["a", "", "c"], ["a", 1, "c"]):
        names.write_text(json.dumps({"class_names": wrong}))
        with pytest.raises(UserError, match="class_names must be 3 distinct names"):
            import_diffusers(tmp_path / "export", tmp_path / "back", log=lambda m: None)
        assert not (tmp_path / "back").exists()
    for record, says in (({"class_names": ["a\x1b[31m", "b", "c"]}, "which holds control"),
                         ({"class_names": ["a", "b", "c"], "label_dropout": 2},
                          "label_dropout 2 is not a share in")):
        names.write_text(json.dumps(record))
        with pytest.raises(UserError, match=says):
            import_diffusers(tmp_path / "export", tmp_path / "back", log=lambda m: None)
        assert not (tmp_path / "back").exists()
