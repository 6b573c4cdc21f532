"""Decoder plugins: real diffusers/timm modules, loaded from saved folders, always returning the asked size."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderDC, AutoencoderKL

from conftest import builtin_preset
from vgt_core.plugins import registry

TINY_KL = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=[16, 32],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=8,
    layers_per_block=1,
)


@pytest.mark.parametrize("name", ["dcae", "sdvae", "vit"])
@pytest.mark.parametrize("size", [(64, 64), (56, 72)])
def test_decoder_returns_requested_size(name, size):
    options = {
        "dcae": builtin_preset("tiny-internvl3")["decoder"]["options"],
        "sdvae": {"config": {**TINY_KL, "latent_channels": 32}},
        "vit": {"width": 32, "depth": 1, "heads": 2, "patch_size": 8},
    }[name]
    decoder = registry().build("decoder", name, options)
    z = torch.randn(2, 32, 4, 4, requires_grad=True)
    out = decoder(z, size)
    assert out.shape == (2, 3, *size)
    out.mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0  # differentiable end to end


def test_dcae_loads_pretrained_decoder_weights(tmp_path):
    config = builtin_preset("tiny-internvl3")["decoder"]["options"]["config"]
    torch.manual_seed(1)
    ae = AutoencoderDC(**config).eval()
    ae.save_pretrained(tmp_path)
    decoder = registry().build("decoder", "dcae", {"pretrained": str(tmp_path)}).eval()
    z = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(decoder(z, (64, 64)), ae.decoder(z))  # 16x upsampling: no resize here
    assert decoder.upsample == 16


def test_sdvae_keeps_pretrained_weights_and_reads_32_channels(tmp_path):
    torch.manual_seed(1)
    ae = AutoencoderKL(**TINY_KL)
    ae.save_pretrained(tmp_path)
    decoder = registry().build("decoder", "sdvae", {"pretrained": str(tmp_path)})
    assert decoder.decoder.conv_in.in_channels == 32
    torch.testing.assert_close(decoder.decoder.conv_out.weight, ae.decoder.conv_out.weight)
    assert decoder(torch.randn(1, 32, 4, 4), (8, 8)).shape == (1, 3, 8, 8)
