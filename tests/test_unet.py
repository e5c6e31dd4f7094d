import pytest
import torch
import torch.nn.functional as F

from ddpmkit.config import load_config
from ddpmkit.errors import UserError
from ddpmkit.unet import UNet, count_parameters, timestep_embedding


def make(size, channels, **overrides):
    cfg = load_config(None, {"model.in_channels": channels, "data.image_size": size, **overrides})
    return UNet(cfg.model, size)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 28])
def test_output_shape_matches_input(channels, size):
    net = make(size, channels, **{"model.base_channels": 16, "model.norm_groups": 8})
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 999])).shape == x.shape


def test_attention_and_three_levels_shapes():
    net = make(32, 3, **{"model.channel_mult": [1, 2, 2], "model.attention_resolutions": [16, 8],
                         "model.attention_head_dim": 8})
    x = torch.randn(2, 3, 32, 32)
    assert net(x, torch.tensor([5, 7])).shape == x.shape
    assert sum(len(level.attentions) for level in net.down) == 4  # 2 blocks at 16 and 2 at 8
    assert net.down[1].attentions[0].heads == 64 // 8


def test_ddpm_cifar10_preset_has_the_papers_parameter_count():
    net = make(32, 3, **{"model.preset": "ddpm-cifar10"})
    assert count_parameters(net) == 35_746_307


def test_small_preset_is_cpu_sized():
    net = make(8, 1, **{"model.preset": "small"})
    assert 0.8e6 < count_parameters(net) < 1.0e6


def test_explicit_keys_override_the_preset():
    cfg = load_config(None,
                      {"model.preset": "ddpm-cifar10", "model.dropout": 0.0, "data.image_size": 32})
    assert cfg.model.base_channels == 128 and cfg.model.dropout == 0.0


def test_image_size_the_unet_cannot_take_is_refused():
    with pytest.raises(UserError, match="data.image_size"):
        load_config(None, {"model.channel_mult": [1, 2, 2], "data.image_size": 10})


def test_timestep_embedding_matches_the_ddpm_formula():
    t = torch.tensor([0.0, 3.0, 500.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    expected = torch.cat([(t[:, None] * freqs).sin(), (t[:, None] * freqs).cos()], 1)
    torch.testing.assert_close(emb, expected)
    flipped = timestep_embedding(t, 8, flip_sin_to_cos=True)
    torch.testing.assert_close(flipped, torch.cat([expected[:, 4:], expected[:, :4]], 1))


def test_group_norm_keeps_low_precision_under_autocast_and_is_nn_group_norm_otherwise(monkeypatch):
    from ddpmkit.unet import GroupNorm

    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 8, eps=1e-6), torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5), ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 6, 6) * 3 + 1
    assert torch.equal(ours(x), ref(x))  # fp32: the same op (CPU training is unchanged)
    xb = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(xb)
    # bf16 out, with bf16-rounded weights (as EDM's GroupNorm), within bf16 precision of fp32
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.group_norm(xb.detach(), 4, ours.weight.bfloat16(),
                                       ours.bias.bfloat16(), 1e-6))
    assert (y.float() - ref(xb.detach().float())).abs().max() < 0.05
    y.float().square().sum().backward()  # gradients reach the fp32 parameters and the input
    assert (ours.weight.grad.dtype == torch.float32 and ours.weight.grad.abs().sum() > 0
            and xb.grad is not None)
    # CUDA's autocast would run group_norm in fp32 (CPU's does not): it is called with autocast off
    seen, group_norm = [], F.group_norm
    monkeypatch.setattr(F, "group_norm",
                        lambda *a, **k: seen.append(torch.is_autocast_enabled("cpu"))
                        or group_norm(*a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(xb)
    assert seen == [False]
