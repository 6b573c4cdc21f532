"""Qwen2.5-VL (Bai et al., 2025, arXiv 2502.13923): its ViT with the patch merger as a VGT-AE encoder, its
language model as an AR backbone. This module only registers them (no torch); the classes are in ``model``."""

from __future__ import annotations

from vgt_adapters.options import LanguageOptions, VisionOptions
from vgt_core import hookimpl


@hookimpl
def vgt_register_encoders(register):
    register(
        "qwen25vl", "vgt_plugins.qwen25vl.model:Qwen25VLEncoder", VisionOptions,
        "Qwen2.5-VL's ViT with its patch merger",
    )


@hookimpl
def vgt_register_backbones(register):
    register(
        "qwen25vl-lm", "vgt_plugins.qwen25vl.model:Qwen25VLBackbone", LanguageOptions,
        "Qwen2.5-VL's language model",
    )
