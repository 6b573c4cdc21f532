"""InternVL3 (Zhu et al., 2025, arXiv 2504.10479) through transformers: its InternViT as a VGT-AE encoder
and its language model as an AR backbone.

Features are what InternVL3 feeds its LLM: InternViT's last layer without CLS, pixel shuffle 0.5 and the
multimodal projector (upstream's ``mlp1``). 448 px -> 32 x 32 patches -> 16 x 16 tokens of the LLM width.
"""

from __future__ import annotations

from torch import nn
from transformers import InternVLConfig, InternVLForConditionalGeneration

from vgt_adapters.hf_language import HFLanguageBackbone
from vgt_adapters.hf_vision import IMAGENET_MEAN, IMAGENET_STD, HFVisionEncoder


class InternVL3Encoder(HFVisionEncoder):
    model_class = InternVLForConditionalGeneration
    config_class = InternVLConfig
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD

    def keep_vision(self, vlm: nn.Module) -> nn.Module:
        model = vlm.model  # InternVLModel: vision_tower + multi_modal_projector (+ language_model, dropped)
        model.language_model = None
        return model

    def native_image_size(self) -> int:
        return self.pair(self.config.vision_config.image_size)[0]

    def output_dim(self) -> int:
        return self.config.text_config.hidden_size

    def grid(self, image_size):
        h, w = self.pair(image_size)
        ph, pw = self.pair(self.config.vision_config.patch_size)
        r = self.config.downsample_ratio
        return int(h // ph * r), int(w // pw * r)

    def forward(self, images):
        return self.tower.get_image_features(pixel_values=self.preprocess(images)).pooler_output


class InternVL3Backbone(HFLanguageBackbone):
    model_class = InternVLForConditionalGeneration
    config_class = InternVLConfig
    default_image_start = "<img>"
