"""SmolVLM (Marafioti et al., 2025, arXiv 2504.05299) for vgt: its SigLIP tower + pixel-shuffle connector as a
VGT-AE encoder, its language model as an AR backbone, and a tiny preset to try both on a CPU.

The second worked example of docs/plugins.md. Its layout differs from LLaVA's where it matters: the language
model sits at ``model.text_model`` (not ``language_model``) and the connector merges each ``scale_factor``^2 patches
into one token. vgt's adapters find the LM through transformers' ``get_decoder()``/``get_text_config()``, so
this module overrides no loading hook.
"""

from __future__ import annotations

import torch
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

from vgt_adapters.hf_language import HFLanguageBackbone, LanguageOptions
from vgt_adapters.hf_vision import HFVisionEncoder, VisionOptions
from vgt_core import hookimpl

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class SmolVLMEncoder(HFVisionEncoder):
    """Features as SmolVLM's LM reads them: SigLIP's last layer, pixel shuffle, the modality projection."""

    model_class = SmolVLMForConditionalGeneration
    config_class = SmolVLMConfig
    default_mean, default_std = SIGLIP_MEAN, SIGLIP_STD

    def grid(self, image_size):
        # the connector pixel-shuffles a square patch grid: scale_factor x scale_factor patches per latent
        return self.square_grid(image_size, self.vision_config.patch_size * self.config.scale_factor)

    def forward(self, images):
        # The two modules get_image_features runs, called directly: it takes (B, images, C, H, W) and drops every
        # image that is all zeros after normalisation (its padding convention), so a mid-grey image would vanish.
        pixels = self.preprocess(images).to(self.tower.dtype)
        return self.tower.connector(self.tower.vision_model(pixel_values=pixels).last_hidden_state)


class SmolVLMBackbone(HFLanguageBackbone):
    model_class = SmolVLMForConditionalGeneration
    config_class = SmolVLMConfig
    default_image_start = "<fake_token_around_image>"  # what precedes every image in SmolVLM's prompts


TINY = {
    "model_type": "smolvlm",
    "scale_factor": 2,
    "image_token_id": 3,
    "vision_config": {"model_type": "smolvlm_vision", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
                    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
}


@hookimpl
def vgt_register_encoders(register):
    register("smolvlm", SmolVLMEncoder, VisionOptions, "SmolVLM's SigLIP tower + pixel-shuffle connector")


@hookimpl
def vgt_register_backbones(register):
    register("smolvlm-lm", SmolVLMBackbone, LanguageOptions, "SmolVLM's language model (model.text_model)")


@hookimpl
def vgt_register_presets(register):
    # tiny-internvl3 (vgt's registry.yaml) gives the tiny DC-AE decoder, the sampler, the head and CPU-sized recipes;
    # encoder and backbone name other components, so they replace the base's whole.
    register(
        "tiny-smolvlm",
        {
            "base": "tiny-internvl3",
            "description": "SmolVLM classes at toy size (64 px, 8x8 patches shuffled to a 4x4 latent), tiny DC-AE decoder",
            "encoder": {"name": "smolvlm", "options": {"config": TINY}},
            # random weights come without a tokenizer: name vgt's byte-level one (it adds the image-start token)
            "backbone": {"name": "smolvlm-lm", "options": {"config": TINY, "tokenizer": "byte-level"}},
        },
    )
