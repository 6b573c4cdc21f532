"""A ViT pixel decoder built from timm blocks: latents -> tokens -> transformer -> pixels (unpatchify).

The paper's Table 4 baseline ("ViT decoder of comparable parameter scale"). timm provides the blocks and the
2-D sin-cos position embedding; the patch-to-pixel head is a linear layer and a pixel shuffle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from vgt_core.checkpointing import checkpoint_forward
from vgt_plugins.vit_decoder import ViTDecoderOptions


class ViTDecoder(nn.Module):
    def __init__(self, options: ViTDecoderOptions):
        super().__init__()
        self.options = options
        self.latent_channels = options.latent_channels
        self.upsample = options.patch_size
        self.embed = nn.Linear(options.latent_channels, options.width)
        self.blocks = nn.Sequential(
            *(Block(options.width, options.heads, options.mlp_ratio, qkv_bias=True) for _ in range(options.depth))
        )
        self.norm = nn.LayerNorm(options.width)
        self.to_pixels = nn.Linear(options.width, 3 * options.patch_size**2)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block's activations in the backward pass."""
        for block in self.blocks:
            checkpoint_forward(block)

    def forward(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, _, h, w = z.shape
        pos = build_sincos2d_pos_embed((h, w), self.options.width, device=z.device, dtype=z.dtype)
        x = self.embed(z.flatten(2).transpose(1, 2)) + pos  # (B, h*w, width)
        x = self.to_pixels(self.norm(self.blocks(x)))  # (B, h*w, 3*p*p)
        x = F.pixel_shuffle(x.transpose(1, 2).reshape(b, -1, h, w), self.options.patch_size)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x
