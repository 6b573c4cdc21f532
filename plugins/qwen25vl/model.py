"""Qwen2.5-VL (Bai et al., 2025, arXiv 2502.13923) through transformers: its ViT (with the patch merger) as
a VGT-AE encoder and its language model as an AR backbone.

Pixels go in as Qwen's flattened patches: each frame repeated ``temporal_patch_size`` times, patches grouped by
merge window, with a ``grid_thw`` per image. 448 px -> 32 x 32 patches -> merger -> 16 x 16 tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vgt_adapters.hf_language import HFLanguageBackbone
from vgt_adapters.hf_vision import CLIP_MEAN, CLIP_STD, HFVisionEncoder


class Qwen25VLEncoder(HFVisionEncoder):
    model_class = Qwen2_5_VLForConditionalGeneration
    config_class = Qwen2_5_VLConfig
    default_mean, default_std = CLIP_MEAN, CLIP_STD

    def keep_vision(self, vlm: nn.Module) -> nn.Module:
        return vlm.model.visual

    def native_image_size(self) -> int:
        vc = self.config.vision_config
        return 16 * vc.patch_size * vc.spatial_merge_size  # 448 for patch 14, merge 2

    def output_dim(self) -> int:
        return self.config.vision_config.out_hidden_size

    def grid(self, image_size):
        h, w = self.pair(image_size)
        vc = self.config.vision_config
        step = vc.patch_size * vc.spatial_merge_size
        return h // step, w // step

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (flattened patches ``(B*h*w*m*m, C*tp*p*p)``, ``grid_thw`` ``(B, 3)``), the layout of
        transformers' ``Qwen2VLImageProcessor``."""
        vc = self.config.vision_config
        p, m, tp = vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size
        x = self.normalize(images)
        b, c, h, w = x.shape
        gh, gw = h // p, w // p
        x = x.unsqueeze(1).expand(b, tp, c, h, w)  # a still image is tp identical frames
        x = x.reshape(b, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (b, gh/m, gw/m, m, m, c, tp, p, p)
        patches = x.reshape(b * gh * gw, c * tp * p * p)
        grid_thw = torch.tensor([[1, gh, gw]] * b, device=images.device)
        return patches, grid_thw

    def forward(self, images):
        patches, grid_thw = self.preprocess(images)
        merged = self.tower(patches, grid_thw=grid_thw).pooler_output  # (B*N, D), images one after another
        return merged.reshape(images.shape[0], -1, merged.shape[-1])


class Qwen25VLBackbone(HFLanguageBackbone):
    model_class = Qwen2_5_VLForConditionalGeneration
    config_class = Qwen2_5_VLConfig
    default_image_start = "<|vision_start|>"
