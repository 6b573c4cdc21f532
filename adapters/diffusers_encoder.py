"""A diffusers autoencoder's encoder as a vgt ``Encoder``: a pixel autoencoder's latent instead of a VLM's features.

This is the baseline of the paper's Table 7: a VGT-AE whose "features" are a plain autoencoder's latent map,
trained jointly with the decoder on reconstruction alone (no VLM, so nothing to self-distil to). The latent map
``(B, C, h, w)`` is read in raster order as ``(B, h*w, C)`` features; phi then projects them to VGT's channels
like any VLM's, so the rest of VGT (stage 2, the latent cache, the generator) runs unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vgt_adapters.diffusers_common import (
    checkpoint_half,
    export_autoencoder,
    keep_half,
    load_autoencoder,
)
from vgt_adapters.options import DiffusersEncoderOptions  # noqa: F401 -- re-exported


class DiffusersEncoder(nn.Module):
    """Base: subclasses set ``model_class`` and say how much the encoder downsamples and what it outputs."""

    model_class: ClassVar[str | type]  # a diffusers class or its name

    def __init__(self, options: DiffusersEncoderOptions):
        super().__init__()
        self.options = options
        ae = load_autoencoder(self.model_class, options)
        self.ae_config = dict(ae.config)
        self.encoder = keep_half(ae.encoder, options)  # the decoder half is dropped
        self.downsample = self.native_downsample(self.ae_config)
        self.feature_dim = self.output_dim(self.ae_config)
        self.image_size = options.image_size
        self.grid(self.image_size)  # fail at construction, not at the first batch, on a size it cannot read

    def native_downsample(self, config: dict) -> int:
        raise NotImplementedError

    def output_dim(self, config: dict) -> int:
        """Channels of the encoder's output map (an autoencoder's latent channels unless it outputs moments)."""
        return int(config["latent_channels"])

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"{type(self).__name__} downsamples {f}x: image size {h}x{w} is not a multiple of {f}")
        return h // f, w // f

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Diffusers autoencoders read images in [-1, 1], VGT's own range: nothing to convert."""
        return images

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.preprocess(images)).flatten(2).transpose(1, 2)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the encoder's activations in the backward pass, block by block."""
        checkpoint_half(self.encoder, "down_blocks")

    def export(self, folder: Path) -> dict:
        return export_autoencoder(self.model_class, self.ae_config, self.options, folder)
