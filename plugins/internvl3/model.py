"""InternVL3 (Zhu et al., 2025, arXiv 2504.10479) through transformers: its InternViT as a VGT-AE encoder
and its language model as an AR backbone.

Features are what InternVL3 feeds its LLM: InternViT's last layer without CLS, pixel shuffle 0.5 and the
multimodal projector (upstream's ``mlp1``). 448 px -> 32 x 32 patches -> 16 x 16 tokens of the LLM width.
"""

from __future__ import annotations

from transformers import InternVLConfig, InternVLForConditionalGeneration

from vgt_adapters.hf_language import HFLanguageBackbone
from vgt_adapters.hf_vision import IMAGENET_MEAN, IMAGENET_STD, HFVisionEncoder


class InternVL3Encoder(HFVisionEncoder):
    model_class = InternVLForConditionalGeneration
    config_class = InternVLConfig
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD

    # The adapter's defaults fit InternVL3: its base model without the LM, vision_config.image_size, the LM width,
    # and get_image_features' pooler_output.

    def grid(self, image_size):
        # transformers' InternVL pixel shuffle reshapes the patch grid as a square
        patch = self.pair(self.vision_config.patch_size)[0]
        return self.square_grid(image_size, patch / self.config.downsample_ratio)


class InternVL3Backbone(HFLanguageBackbone):
    model_class = InternVLForConditionalGeneration
    config_class = InternVLConfig
    default_image_start = "<img>"
