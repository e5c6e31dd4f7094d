import pytest
import torch

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
    cfg = load_config(None, {"model.preset": "ddpm-cifar10", "model.dropout": 0.0, "data.image_size": 32})
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
