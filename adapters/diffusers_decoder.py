"""A diffusers autoencoder's decoder as a vgt ``Decoder``; the output is resized to the requested size.

VGT reads a 16x16 latent from a 448 px image (stride 28) while DC-AE upsamples 32x, so the decoder's
512 px output is resized to 448 px, as the released upstream code does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vgt_adapters.diffusers_common import (
    checkpoint_half,
    export_autoencoder,
    keep_half,
    load_autoencoder,
)
from vgt_adapters.options import DiffusersDecoderOptions  # noqa: F401 -- re-exported


class DiffusersDecoder(nn.Module):
    """Base: subclasses set ``model_class`` and may adapt the loaded autoencoder in ``adapt``."""

    model_class: ClassVar[str | type]  # a diffusers class or its name

    def __init__(self, options: DiffusersDecoderOptions):
        super().__init__()
        latent_channels = options.latent_channels
        self.options = options
        ae = self.adapt(load_autoencoder(self.model_class, options), latent_channels)
        self.ae_config = dict(ae.config)
        self.decoder = keep_half(ae.decoder, options)  # the encoder half is dropped
        self.latent_channels = latent_channels
        self.upsample = self.native_upsample(self.ae_config)

    def adapt(self, ae: nn.Module, latent_channels: int) -> nn.Module:
        """Make the loaded autoencoder take ``latent_channels`` channels (identity by default)."""
        return ae

    def native_upsample(self, config: dict) -> int:
        raise NotImplementedError

    def forward(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.decoder(z)
        if tuple(x.shape[-2:]) != tuple(size):
            mode = self.options.resize
            x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=None if mode == "nearest" else False)
        return x

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoder's activations in the backward pass, block by block."""
        checkpoint_half(self.decoder, "up_blocks")

    def export(self, folder: Path) -> dict:
        return export_autoencoder(self.model_class, self.ae_config, self.options, folder)
