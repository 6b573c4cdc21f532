"""DC-AE (Chen et al., 2024, arXiv 2410.10733) decoder through diffusers ``AutoencoderDC``, f32c32 layout;
VGT's default pixel decoder (paper Table 4)."""

from __future__ import annotations

from vgt_adapters.diffusers_decoder import DiffusersDecoder


class DCAEDecoder(DiffusersDecoder):
    model_class = "AutoencoderDC"  # imported when built: registering stays fast

    def adapt(self, ae, latent_channels):
        if ae.config.latent_channels != latent_channels:
            raise ValueError(f"DC-AE takes {ae.config.latent_channels} latent channels, VGT-AE has {latent_channels}")
        return ae

    def native_upsample(self, config):
        return 2 ** (len(config["decoder_block_out_channels"]) - 1)
