"""InternVL3 (Zhu et al., 2025, arXiv 2504.10479): its InternViT as a VGT-AE encoder, its language model as an
AR backbone. This module only registers them (no torch); the classes are in ``model``, imported when built."""

from __future__ import annotations

from vgt_adapters.options import LanguageOptions, VisionOptions
from vgt_core import hookimpl


@hookimpl
def vgt_register_encoders(register):
    register(
        "internvl3", "vgt_plugins.internvl3.model:InternVL3Encoder", VisionOptions,
        "InternVL3's InternViT + pixel shuffle + projector",
    )


@hookimpl
def vgt_register_backbones(register):
    register(
        "internvl3-lm", "vgt_plugins.internvl3.model:InternVL3Backbone", LanguageOptions,
        "InternVL3's language model (Qwen2.5)",
    )
