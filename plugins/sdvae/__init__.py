"""SD-VAE (Rombach et al., 2022) decoder through diffusers ``AutoencoderKL``, taking VGT's 32 channels.
This module only registers it (no torch); the class is in ``model``, imported when built."""

from __future__ import annotations

from vgt_adapters.options import DiffusersDecoderOptions
from vgt_core import hookimpl


@hookimpl
def vgt_register_decoders(register):
    register(
        "sdvae", "vgt_plugins.sdvae.model:SDVAEDecoder", DiffusersDecoderOptions,
        "SD-VAE decoder (diffusers AutoencoderKL), 32-channel input",
    )
