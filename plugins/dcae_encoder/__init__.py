"""DC-AE's encoder as a VGT-AE encoder: the pixel-VAE baseline of the paper's Table 7.
This module only registers it (no torch); the class is in ``model``, imported when built."""

from __future__ import annotations

from vgt_adapters.options import DiffusersEncoderOptions
from vgt_core import hookimpl


@hookimpl
def vgt_register_encoders(register):
    register(
        "dcae-encoder", "vgt_plugins.dcae_encoder.model:DCAEEncoder", DiffusersEncoderOptions,
        "DC-AE encoder (diffusers AutoencoderDC): a pixel autoencoder, no VLM",
    )
