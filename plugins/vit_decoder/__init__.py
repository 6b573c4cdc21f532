"""A ViT pixel decoder from timm blocks (the paper's Table 4 baseline).
This module registers it and holds its options (no torch); the class is in ``model``, imported when built."""

from __future__ import annotations

from pydantic import Field

from vgt_core import hookimpl
from vgt_core.registry import Options


class ViTDecoderOptions(Options):
    latent_channels: int = Field(32, gt=0)
    width: int = Field(768, gt=0)
    depth: int = Field(12, gt=0)
    heads: int = Field(12, gt=0)
    mlp_ratio: float = 4.0
    patch_size: int = Field(16, gt=0, description="pixels per latent cell before the final resize")


@hookimpl
def vgt_register_decoders(register):
    register(
        "vit", "vgt_plugins.vit_decoder.model:ViTDecoder", ViTDecoderOptions,
        "ViT decoder from timm blocks + unpatchify",
    )
