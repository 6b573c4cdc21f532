"""DC-AE (Chen et al., 2024, arXiv 2410.10733) decoder through diffusers ``AutoencoderDC``: VGT's default pixel
decoder.
This module only registers it (no torch); the class is in ``model``, imported when built."""

from __future__ import annotations

from vgt_adapters.options import DiffusersDecoderOptions
from vgt_core import hookimpl


@hookimpl
def vgt_register_decoders(register):
    register(
        "dcae", "vgt_plugins.dcae.model:DCAEDecoder", DiffusersDecoderOptions,
        "DC-AE decoder (diffusers AutoencoderDC), resized to size",
    )
