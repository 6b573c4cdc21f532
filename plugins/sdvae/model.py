"""SD-VAE (Rombach et al., 2022) decoder through diffusers ``AutoencoderKL``, taking VGT's 32 channels.

A pretrained SD-VAE reads 4 channels; its first convolution is replaced by a fresh one that reads 32 (the
rest of the decoder keeps its pretrained weights), as the paper's Table 4 comparison needs.
"""

from __future__ import annotations

from torch import nn

from vgt_adapters.diffusers_decoder import DiffusersDecoder


class SDVAEDecoder(DiffusersDecoder):
    model_class = "AutoencoderKL"  # imported when built: registering stays fast

    def adapt(self, ae, latent_channels):
        if ae.config.latent_channels != latent_channels:
            old = ae.decoder.conv_in
            ae.decoder.conv_in = nn.Conv2d(latent_channels, old.out_channels, old.kernel_size, padding=old.padding)
            ae.register_to_config(latent_channels=latent_channels)
        return ae

    def native_upsample(self, config):
        return 2 ** (len(config["block_out_channels"]) - 1)
