"""DC-AE's encoder (diffusers ``AutoencoderDC``) as a VGT-AE encoder: the pixel-VAE baseline of the paper's
Table 7, a plain autoencoder's latent space for the language model to learn, with no VLM behind it.

Train it from scratch with the decoder (``train_ae.stage1.distill_weight: 0``: there is no pretrained encoder
whose features could be kept); see the ``pairing`` matrix in registry.yaml and docs/ablations.md (results: docs/results/).
"""

from __future__ import annotations

from vgt_adapters.diffusers_encoder import DiffusersEncoder


class DCAEEncoder(DiffusersEncoder):
    model_class = "AutoencoderDC"  # imported when built: registering stays fast

    def native_downsample(self, config):
        return 2 ** (len(config["encoder_block_out_channels"]) - 1)
