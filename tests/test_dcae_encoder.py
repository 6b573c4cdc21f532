"""The `dcae-encoder` plugin: a pixel autoencoder's encoder (the pixel-VAE baseline of Table 7) in a VGT-AE."""

from __future__ import annotations

import pytest
import torch

from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.compose import build_autoencoder
from vgt_core.config import load_presets
from vgt_core.training.autoencoder import train_autoencoder
from vgt_core.training.run import log_file
from vgt_shapes import ShapesDataset, ShapesOptions


def pixel_vae_preset(**stage1):
    """shapes-demo with the `pairing` matrix's pixel-VAE encoder (32 px, DC-AE encoder, 4x4 latent)."""
    book = load_presets()
    overrides = dict(book.matrix("pairing").cells["pixel-vae"])
    overrides.update({f"train_ae.stage1.{k}": v for k, v in stage1.items()})
    return book.preset("shapes-demo", overrides)


def test_dcae_encoder_makes_a_32_channel_latent_and_exports_offline(tmp_path):
    torch.manual_seed(0)
    ae = build_autoencoder(pixel_vae_preset()).eval()
    assert ae.encoder.downsample == 8 and ae.encoder.feature_dim == 32
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        features, z = ae.features(images), ae.encode(images)
        assert features.shape == (3, 16, 32)  # the 4x4 latent map in raster order
        assert z.shape == (3, 32, 4, 4)
        assert ae.decode(z).shape == images.shape
    ae.save_pretrained(tmp_path / "ae")
    again = VGTAutoencoder.from_pretrained(tmp_path / "ae")  # rebuilt from its own folder, nothing else
    with torch.no_grad():
        torch.testing.assert_close(again.encode(images), z)


def test_dcae_encoder_rejects_a_size_it_cannot_read():
    from vgt_core.plugins import registry

    options = pixel_vae_preset().encoder.options
    with pytest.raises(ValueError, match="image size 30x30 is not a multiple of 8"):
        registry().build("encoder", "dcae-encoder", {**options, "image_size": 30})


def test_pixel_vae_trains_as_a_plain_autoencoder(tmp_path):
    """Reconstruction alone (no distillation term), the encoder learning with the decoder; the loss falls."""
    preset = pixel_vae_preset(batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=1000, sample_every=1000)
    data = ShapesDataset(ShapesOptions(image_size=32, size=256))
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in build_autoencoder(preset).encoder.state_dict().items()}
    model = train_autoencoder(preset, tmp_path / "run", stage=1, data=data, steps=40, progress=False)
    log = log_file(tmp_path / "run")
    assert all("distill" not in row for row in log)
    first, last = log[0]["mse"], sum(row["mse"] for row in log[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    after = VGTAutoencoder.from_pretrained(model).encoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the encoder itself learned
