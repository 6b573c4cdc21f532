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
from transformers import AutoImageProcessor, PretrainedConfig, PreTrainedModel

from vgt_adapters.options import PretrainedOptions, VisionOptions  # noqa: F401 -- re-exported
from vgt_adapters.hf_common import (
    checkpoint_transformer,
    child_name,
    export_config,
    load_part,
    resolve_config,
    text_config_name,
)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class HFVisionEncoder(nn.Module):
    """Base of VLM vision encoders: a family sets the classes and ``grid``; the rest has defaults that hold for
    VLMs laid out as transformers' usual ``model.{vision tower, projector, language model}``.

    Set by a subclass (class attributes):

    ==========================  ============================================================================
    ``model_class``             required: the transformers VLM class (``...ForConditionalGeneration``)
    ``config_class``            required: its config class (``config`` dicts are read with it)
    ``default_mean/std``        ImageNet's: pixel normalisation when the checkpoint has no image processor
                                (``IMAGENET_*``, ``CLIP_*`` here; ``image_mean/std`` options override both)
    ``text_config_keys``        ``("hidden_size",)``: what the kept part reads of the LM's config; the export
                                keeps only these of it
    ==========================  ============================================================================

    Hooks:

    ==========================  ============================================================================
    ``grid(image_size)``        required: the latent grid ``(h, w)`` for an input side (int) or ``(H, W)``
    ``keep_vision(vlm)``        the module that stays in memory, ``self.tower`` (``vlm`` is built on the meta
                                device: only what this returns is read). Default: ``vlm.model`` with its language
                                model (found by ``get_decoder()``) set to ``None``
    ``native_image_size()``     default ``vision_config.image_size`` (its height when a pair)
    ``output_dim()``            the feature width ``d``. Default: the LM's ``hidden_size`` (the projector maps
                                to it)
    ``preprocess(images)``      ``[-1, 1]`` images -> what the tower reads. Default: ``normalize(images)``
    ``forward(images)``         ``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, h*w, d)``. Default: the tower's
                                ``get_image_features(pixel_values=preprocess(images))``, its pooled output
                                (tensor, list or tuple of per-image features) made one ``(B, N, d)`` tensor
    ==========================  ============================================================================

    Set by ``__init__`` for the hooks to read: ``options`` (``VisionOptions``), ``config`` (the whole VLM config),
    ``text_config`` (the LM's, via ``get_text_config``), ``vision_config``, ``tower``, ``image_mean/std``,
    ``image_size``, ``feature_dim``. Helpers: ``pair(size)`` (an int or a pair -> ``(h, w)``),
    ``square_grid(image_size, step)`` (a pixel-shuffled square grid, else an error), ``normalize(images)``,
    ``batched_features(features, batch)``.
    """

    model_class: ClassVar[type[PreTrainedModel]]
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
        self.text_config = self.config.get_text_config(decoder=True)
        self.vision_config = getattr(self.config, "vision_config", None)
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
        built on the meta device: only what this returns gets weights). Default: the VLM's base model
        (``vlm.model``) without its language model, wherever the family keeps it."""
        model = vlm.base_model
        lm = model.get_decoder() if hasattr(model, "get_decoder") else model
        if model is vlm or lm is model:
            raise TypeError(
                f"{type(self).__name__}: no vision part and language model found in {type(vlm).__name__} "
                f"(base_model, get_decoder()): override keep_vision(vlm) to return the vision part"
            )
        setattr(model, child_name(model, lm), None)
        return model

    def native_image_size(self) -> int:
        """The side the VLM was trained at: ``image_size`` when the options give none."""
        if self.vision_config is None or not hasattr(self.vision_config, "image_size"):
            raise NotImplementedError(
                f"{type(self).__name__}: override native_image_size() (the config has no vision_config.image_size)"
            )
        return self.pair(self.vision_config.image_size)[0]

    def output_dim(self) -> int:
        """The feature width ``d``: the LM's width, which the VLM's projector maps to."""
        return self.text_config.hidden_size

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """The latent grid ``(h, w)`` (``forward`` returns ``h * w`` tokens) for an input of ``image_size``."""
        raise NotImplementedError(f"{type(self).__name__} must define grid(image_size)")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` -> ``(B, h*w, d)``: what the VLM's language model reads."""
        out = self.tower.get_image_features(pixel_values=self.preprocess(images))
        return self.batched_features(getattr(out, "pooler_output", out), images.shape[0])

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
            drop=tuple(filter(None, [text_config_name(self.config)])),
            keep=self.text_config_keys,
            image_size=self.image_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
        )

    @staticmethod
    def pair(size: int | tuple[int, int]) -> tuple[int, int]:
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def square_grid(self, image_size: int | tuple[int, int], step: float) -> tuple[int, int]:
        """The grid of a tower whose pixel shuffle reshapes a square patch grid (InternVL, Idefics3/SmolVLM): one
        latent per ``step`` pixels of a square side; any other size is an error here, not a reshape in forward."""
        h, w = self.pair(image_size)
        if h != w or h % step:
            raise ValueError(
                f"{type(self).__name__}: its pixel shuffle needs a square image whose side is a multiple of {step:g}; "
                f"got {h}x{w}"
            )
        return int(h // step), int(w // step)

    @staticmethod
    def batched_features(features: Any, batch: int) -> torch.Tensor:
        """A tower's image features as one ``(batch, N, d)`` tensor, whichever way the family returns them: a
        ``(B, N, d)`` tensor, a ``(B * N, d)`` one (images one after another), or a list/tuple of per-image
        ``(N, d)`` tensors. A count that does not split into ``batch`` images is an error, not a reshape."""
        if isinstance(features, (list, tuple)):
            if len(features) != batch:
                raise ValueError(f"the tower returned features of {len(features)} images for a batch of {batch}")
            features = torch.stack([f.reshape(-1, f.shape[-1]) for f in features])
        if features.dim() == 2:
            if features.shape[0] % batch:
                raise ValueError(f"{features.shape[0]} feature rows do not split into {batch} images")
            features = features.reshape(batch, -1, features.shape[-1])
        if features.dim() != 3 or features.shape[0] != batch:
            raise ValueError(f"image features of shape {tuple(features.shape)} for a batch of {batch} images")
        return features
