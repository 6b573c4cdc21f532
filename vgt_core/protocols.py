"""The four protocols that everything model-specific sits behind.

The AE side (``Encoder``, ``Decoder``) and the AR side (``ARBackbone``, ``Sampler``) meet only at the latent:
a ``(B, C, h, w)`` tensor (C = 32 by default) and its normalisation. That is what makes any pairing possible,
a Qwen2.5-VL autoencoder with an InternVL3 language model included.

Components are ``torch.nn.Module`` objects. Images cross every boundary as float tensors in ``[-1, 1]``,
shape ``(B, 3, H, W)``; each encoder converts them to its VLM's own normalisation in ``preprocess``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from vgt_core.config import GenerationConfig
    from vgt_core.generator import PromptBatch, VGTGenerator
    from vgt_core.randomness import Draws


@runtime_checkable
class Exportable(Protocol):
    def export(self, folder: Path) -> dict[str, Any]:
        """Write what is needed to rebuild this component's architecture offline (e.g. a transformers
        ``config.json``) into ``folder`` and return the options that rebuild it from there without loading
        weights; the owner saves the weights in its own safetensors file."""


@runtime_checkable
class SupportsGradientCheckpointing(Protocol):
    """A component that can recompute its activations in the backward pass instead of keeping them.

    Optional for every component. ``vgt_core.checkpointing.enable_gradient_checkpointing(model)`` calls it on each
    component that has it when the training config's ``gradient_checkpointing`` is on (the only switch)."""

    def enable_gradient_checkpointing(self) -> None:
        """Turn activation checkpointing on for this component's own layers (the result must not change)."""


@runtime_checkable
class Encoder(Protocol):
    """A VLM's vision tower (and projector), returning the features its language model would see."""

    feature_dim: int
    image_size: int

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Latent grid ``(h, w)`` for an input of this size (448 px -> 16 x 16 for InternVL3 and Qwen2.5-VL)."""

    def preprocess(self, images: torch.Tensor) -> Any:
        """Images in [-1, 1] -> the tower's own input (normalisation constants, Qwen's flattened patches)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], ``(B, 3, H, W)`` -> features ``(B, h*w, feature_dim)`` in raster order."""


@runtime_checkable
class Decoder(Protocol):
    """A pixel decoder from ``latent_channels``-channel latents."""

    latent_channels: int
    upsample: int

    def forward(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> images in [-1, 1] of exactly ``size`` (resized if the native
        upsampling differs, e.g. DC-AE's 32x to VGT's 28x)."""


@runtime_checkable
class ARBackbone(Protocol):
    """A causal language model with its tokenizer and prompt template."""

    hidden_size: int

    def embed_prompts(self, prompts: list[str], max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat-templated, left-padded prompt embeddings ``(B, T, D)`` and their mask ``(B, T)``; the
        image-start token, when the model has one, ends each prompt. A prompt longer than ``max_tokens``
        (before the image-start token) is cut to its first ``max_tokens`` tokens, with a warning."""

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any | None = None,
    ) -> tuple[torch.Tensor, Any | None]:
        """Hidden states ``(B, L, D)`` and the updated KV cache. ``attention_mask`` is ``(B, past + L)`` of
        0/1 (causal attention is implied) or an additive ``(B, 1, L, past + L)`` float mask."""

    def new_cache(self) -> Any:
        """An empty KV cache for generation."""


@runtime_checkable
class Sampler(Protocol):
    """A generation scheme: the training sequence layout and the decoding loop."""

    def training_targets(
        self, generator: VGTGenerator, tokens: torch.Tensor, grid: tuple[int, int], prompts: PromptBatch, draws: Draws | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lay out one training batch and run the backbone. ``tokens`` are clean latents ``(B, N, C)`` in
        raster order. Every random choice (orders, masks) must come from ``draws`` (``draws.rand(draws.per_sample(B),
        ...)``; ``GlobalDraws()`` when None), which in training gives each sample its own stream, so that a run on
        many processes computes what one process computes. Returns the backbone hidden states that condition the head ``(B, M, D)``, the raster
        index of the latent each must predict ``(B, M)`` (long) and a mask ``(B, M)`` of the positions that
        count in the loss. The generator gathers the targets (and any per-position payload, e.g. REPA features)."""

    def generate(
        self, generator: VGTGenerator, prompts: PromptBatch, grid: tuple[int, int], config: GenerationConfig, rng: Any
    ) -> torch.Tensor:
        """Sample latent tokens ``(B, N, C)`` in raster order. ``rng`` is a ``SampleDraws`` with one generator per
        image (or, from older callers, one ``torch.Generator``): draw through ``decoding_orders(..., rng)`` and
        ``generator.sample_tokens(..., rng)`` (or ``rng.generators[i]`` for image ``i``), never one stream shared by
        the batch, so that an image does not depend on the batch it is generated in."""
