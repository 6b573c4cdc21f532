"""A transformers VLM's vision tower as a vgt ``Encoder``.

A subclass per VLM family says which transformers class to load, which part of it to keep, how its pixels
are laid out and which features its language model reads. Everything else (options, loading from a hub id or
a folder, normalisation constants, offline export) is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoImageProcessor, PretrainedConfig

from vgt_adapters.options import PretrainedOptions, VisionOptions  # noqa: F401 -- re-exported
from vgt_adapters.hf_common import (
    checkpoint_transformer,
    export_config,
    load_part,
    resolve_config,
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class HFVisionEncoder(nn.Module):
    """Base of VLM vision encoders; subclasses set the class attributes and the four hooks below."""

    model_class: ClassVar[Any]
    config_class: ClassVar[type[PretrainedConfig]]
    default_mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    default_std: ClassVar[tuple[float, float, float]] = IMAGENET_STD
    # what the kept part reads from the language model's config: the projector maps to the LM width. The export
    # keeps only these of the text config (a family whose tower reads more names them here).
    text_config_keys: ClassVar[tuple[str, ...]] = ("hidden_size",)

    def __init__(self, options: VisionOptions):
        super().__init__()
        self.options = options
        self.config = resolve_config(options, self.config_class)
        # only the vision part is built and read; the language model stays on the meta device and is dropped
        self.tower = load_part(self.model_class, self.config, self.keep_vision, options)
        mean, std = self.image_mean, self.image_std = self._normalisation(options)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.image_size = options.image_size or self.native_image_size()
        self.feature_dim = self.output_dim()

    # -- per-family hooks ---------------------------------------------------------------------------------------

    def keep_vision(self, vlm: nn.Module) -> nn.Module:
        """The module that stays in memory: the vision tower and whatever maps it to the LM's input (``vlm`` is
        built on the meta device: only what this returns gets weights)."""
        raise NotImplementedError

    def native_image_size(self) -> int:
        raise NotImplementedError

    def output_dim(self) -> int:
        raise NotImplementedError

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------------------------

    def _normalisation(self, options: VisionOptions) -> tuple[tuple, tuple]:
        if options.image_mean is not None and options.image_std is not None:
            return options.image_mean, options.image_std
        if options.pretrained is not None:
            try:
                processor = AutoImageProcessor.from_pretrained(options.pretrained, revision=options.revision)
                return tuple(map(float, processor.image_mean)), tuple(map(float, processor.image_std))
            except (OSError, ValueError, KeyError, AttributeError):
                pass  # a bare model folder (e.g. a test's tiny model) has no preprocessor: use the family's
        return self.default_mean, self.default_std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> the VLM's normalisation (what its image processor does after resizing)."""
        return ((images + 1) / 2 - self.mean) / self.std

    def preprocess(self, images: torch.Tensor) -> Any:
        return self.normalize(images)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the tower's layers in the backward pass (transformers' own switch, non-reentrant)."""
        checkpoint_transformer(self.tower)

    def export(self, folder: Path) -> dict:
        """The VLM config without its language model (but the keys the kept part reads), so a reload never
        builds it."""
        return export_config(
            self.config,
            folder,
            self.options,
            drop="text_config",
            keep=self.text_config_keys,
            image_size=self.image_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
        )

    @staticmethod
    def pair(size: int | tuple[int, int]) -> tuple[int, int]:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
