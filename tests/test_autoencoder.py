"""VGT-AE: the projection, latent normalisation, noise, and save/load."""

from __future__ import annotations

import pytest
import torch

from conftest import builtin_preset
from vgt_core.autoencoder import ResidualProjection, VGTAutoencoder


def tiny_ae(name="tiny-internvl3", **kw) -> VGTAutoencoder:
    preset = builtin_preset(name)
    torch.manual_seed(0)
    return VGTAutoencoder.from_specs(preset["encoder"], preset["decoder"], **kw)


def test_projection_is_upstreams_layout():
    proj = ResidualProjection(64, 32)
    assert len(proj.blocks) == 3
    names = [type(m).__name__ for m in proj.down]
    assert names == ["LayerNorm", "Linear", "GELU", "Linear"]
    assert proj.down[1].out_features == 32 and proj.down[3].in_features == 32


@pytest.mark.parametrize("name", ["tiny-internvl3", "tiny-qwen25vl"])
def test_save_and_load_round_trip(tmp_path, images, name):
    ae = tiny_ae(name, latent_norm="batchnorm").train()
    ae.encode(images)  # moves the batchnorm running estimates away from their initial values
    ae.eval()
    ae.save_pretrained(tmp_path / "ae")
    loaded = VGTAutoencoder.from_pretrained(tmp_path / "ae")
    assert loaded.latent_norm.kind == "batchnorm"
    with torch.no_grad():
        torch.testing.assert_close(loaded(images)["reconstruction"], ae(images)["reconstruction"])
        torch.testing.assert_close(loaded.latent_norm.bn.running_mean, ae.latent_norm.bn.running_mean)
    assert not (tmp_path / "ae" / "encoder" / "model.safetensors").exists()  # one weights file for the whole AE


def test_layernorm_normalises_each_position_and_noise_only_in_training(images):
    ae = tiny_ae(latent_norm="layernorm", noise_sigma=0.5).eval()
    with torch.no_grad():
        z = ae.encode(images)
        raw = ae.projection(ae.features(images))  # (B, N, C) before normalisation
        mean, var = raw.mean(-1), raw.var(-1, unbiased=False)
        expected = (raw - mean[..., None]) / torch.sqrt(var[..., None] + 1e-6)  # per position, no affine, eps 1e-6
        torch.testing.assert_close(z.flatten(2).transpose(1, 2), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ae.encode(images), z)  # eval: deterministic, no noise
        ae.train()
        noisy = ae.encode(images)
    assert (noisy - z).abs().max() > 1e-3


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_after(images):
    ae = tiny_ae(latent_norm="batchnorm").train()
    with torch.no_grad():
        for _ in range(50):
            z = ae.encode(images)
    per_channel = z.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(32), atol=1e-4, rtol=0)
    ae.eval()
    with torch.no_grad():
        z_eval = ae.encode(images)
        raw = ae.projection(ae.features(images)).transpose(1, 2).reshape_as(z)
    bn = ae.latent_norm.bn
    expected = (raw - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    torch.testing.assert_close(z_eval, expected, atol=1e-4, rtol=1e-4)  # inference uses the saved estimates
    torch.testing.assert_close(bn.running_mean, raw.transpose(0, 1).flatten(1).mean(1), atol=1e-6, rtol=2e-2)


def test_decode_defaults_to_the_encoders_stride(images):
    ae = tiny_ae().eval()
    with torch.no_grad():
        z = ae.encode(images)
        assert ae.decode(z).shape == images.shape
        assert ae.decode(z[..., :2, :3]).shape == (2, 3, 32, 48)  # stride 16 px per latent cell
