"""LLaVA (Liu et al., 2023, arXiv 2304.08485) for vgt: its CLIP vision tower + projector as a VGT-AE
encoder, its language model as an AR backbone, and a tiny preset to try both on a CPU.

The worked example of docs/plugins.md: a new VLM is one module on top of vgt's transformers adapters.
"""

from __future__ import annotations

from transformers import LlavaConfig, LlavaForConditionalGeneration

from vgt_adapters.hf_language import HFLanguageBackbone, LanguageOptions
from vgt_adapters.hf_vision import CLIP_MEAN, CLIP_STD, HFVisionEncoder, VisionOptions
from vgt_core import hookimpl


class LlavaEncoder(HFVisionEncoder):
    """Features as LLaVA's LLM reads them: CLIP's penultimate layer without CLS, then the projector.

    The adapter's defaults fit LLaVA's layout (``model.{vision_tower, multi_modal_projector, language_model}``):
    the tower is ``vlm.model`` without its LM, the features ``get_image_features``' pooled output, their width the
    LM's; only the grid is the family's own."""

    model_class = LlavaForConditionalGeneration
    config_class = LlavaConfig
    default_mean, default_std = CLIP_MEAN, CLIP_STD

    def grid(self, image_size):
        h, w = self.pair(image_size)
        patch = self.vision_config.patch_size
        return h // patch, w // patch


class LlavaBackbone(HFLanguageBackbone):
    model_class = LlavaForConditionalGeneration
    config_class = LlavaConfig


TINY = {
    "model_type": "llava",
    "image_token_id": 3,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
    "text_config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
                    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
}


@hookimpl
def vgt_register_encoders(register):
    register("llava", LlavaEncoder, VisionOptions, "LLaVA's CLIP vision tower + projector")


@hookimpl
def vgt_register_backbones(register):
    register("llava-lm", LlavaBackbone, LanguageOptions, "LLaVA's language model")


@hookimpl
def vgt_register_presets(register):
    # tiny-internvl3 (vgt's registry.yaml) gives the tiny DC-AE decoder, the sampler, the head and CPU-sized recipes;
    # encoder and backbone name other components, so they replace the base's whole.
    register(
        "tiny-llava",
        {
            "base": "tiny-internvl3",
            "description": "LLaVA classes at toy size (64 px, 4x4 latent) with vgt's tiny DC-AE decoder",
            "encoder": {"name": "llava", "options": {"config": TINY}},
            # random weights come without a tokenizer: name vgt's byte-level one (it adds the image-start token)
            "backbone": {"name": "llava-lm", "options": {"config": TINY, "tokenizer": "byte-level"}},
        },
    )
