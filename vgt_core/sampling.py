"""The sampler toolkit: what a generation scheme (``protocols.Sampler``) is given and the helpers it may use.

A sampler never sees the ``VGTGenerator``. It is given, once, the LM width and the largest latent grid
(``setup(hidden_size, max_grid)``), and at every call a ``SamplerContext``: the backbone, the learnable position
grid, the latent embedding and the flow head's sampler. Everything in this module is public and stable for plugin
authors; the generator's other members are not.

    class MySampler(nn.Module):
        def setup(self, hidden_size, max_grid): ...
        def training_targets(self, ctx, tokens, grid, prompts, draws=None): ...
        def generate(self, ctx, prompts, grid, config, rng): ...
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from vgt_core.randomness import SampleDraws

if TYPE_CHECKING:
    from vgt_core.config import GenerationConfig
    from vgt_core.protocols import ARBackbone

__all__ = [
    "PromptBatch",
    "SamplerContext",
    "center_crop",
    "decoding_orders",
    "guidance_at",
    "position_ids_from",
]


@dataclass
class PromptBatch:
    """Left-padded prompt embeddings ``(R, T, D)`` and mask ``(R, T)``. With classifier-free guidance the
    rows are ``[conditional..., unconditional...]`` and ``guided`` is True."""

    embeds: torch.Tensor
    mask: torch.Tensor
    guided: bool = False


@dataclass(frozen=True)
class SamplerContext:
    """What a sampler may use of the generator, and nothing else (so a sampler is a plugin, not a generator patch).

    ``VGTGenerator`` has members of the same names and meaning, so it can stand in for a context (older callers
    and tests pass the generator itself); the generator passes ``generator.sampler_context()``.
    """

    backbone: ARBackbone
    """The language model: ``backbone(inputs_embeds, attention_mask, position_ids, cache)`` and ``new_cache()``."""
    latent_channels: int
    """C, the channels of a latent token."""
    positions: Callable[[tuple[int, int]], torch.Tensor]
    """``positions(grid)`` -> the learnable position embeddings ``(h*w, D)`` of the latent grid, raster order."""
    embed_latents: Callable[..., torch.Tensor]
    """``embed_latents(tokens, positions=None)``: latent tokens ``(R, n, C)`` -> LM inputs ``(R, n, D)``, plus
    ``positions`` ``(n, D)`` or ``(R, n, D)`` when given."""
    sample_tokens: Callable[..., torch.Tensor]
    """``sample_tokens(hidden, prompts, config, scale, rng)``: the flow head solved for every LM state in ``hidden``
    ``(R, m, D)`` (CFG rows [cond, uncond] combined with ``scale``) -> renormalised latents ``(B, m, C)``, each
    image's noise from its own generator in ``rng``."""


def new_cache(backbone: Any, config: GenerationConfig, length: int) -> Any:
    """The KV cache ``config.cache_implementation`` asks for: the backbone's growing cache, or one preallocated for
    ``length`` positions (the prompt and every slot the sampler will feed), which the backbone must support."""
    if config.cache_implementation == "dynamic":
        return backbone.new_cache()
    if "max_length" not in inspect.signature(backbone.new_cache).parameters:  # not a caught TypeError: that would also
        raise ValueError(  # hide a TypeError raised inside a backbone that does preallocate
            f"generation.cache_implementation 'static': {type(backbone).__name__}.new_cache takes no max_length, so it "
            "cannot preallocate; allowed for this backbone: 'dynamic'"
        )
    return backbone.new_cache(max_length=length)


def center_crop(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, D, G, G)`` -> ``(h*w, D)``, the centre ``h x w`` window in raster order."""
    g_h, g_w = grid.shape[-2:]
    h, w = size
    if h > g_h or w > g_w:
        raise ValueError(f"latent grid {h}x{w} exceeds the generator's max_grid {g_h}x{g_w}")
    top, left = (g_h - h) // 2, (g_w - w) // 2
    return grid[0, :, top : top + h, left : left + w].flatten(1).transpose(0, 1)


def decoding_orders(
    prompts: PromptBatch, grid: tuple[int, int], order: str, rng: torch.Generator | SampleDraws
) -> tuple[torch.Tensor, torch.Tensor]:
    """The order in which each image's positions are generated, ``(B, N)``: a seeded random permutation per image
    (from each image's own generator when ``rng`` is ``SampleDraws``) or raster; and the same per prompt row
    ``(R, N)``, so both CFG branches of an image follow its order."""
    rows = prompts.embeds.shape[0]
    images, total = (rows // 2 if prompts.guided else rows), grid[0] * grid[1]
    if order == "raster":
        orders = torch.arange(total).expand(images, total).clone()
    elif isinstance(rng, SampleDraws):
        if len(rng) != images:
            raise ValueError(f"{len(rng)} image generators for {images} images")
        orders = torch.stack([torch.randperm(total, generator=g) for g in rng.generators])
    else:
        orders = torch.stack([torch.randperm(total, generator=rng) for _ in range(images)])
    orders = orders.to(prompts.embeds.device)
    return orders, torch.cat([orders, orders]) if prompts.guided else orders


def position_ids_from(mask: torch.Tensor) -> torch.Tensor:
    """1-D positions that skip padding: real tokens count 0, 1, 2, ... from each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def guidance_at(config: GenerationConfig, done: int, step: int, total: int) -> float:
    """The CFG scale for a step that samples ``step`` tokens after ``done`` of ``total``.

    ``increasing`` ramps 1 -> scale (MAR's "linear"); ``decreasing`` ramps scale -> 1 (NextStep's and upstream's
    "linear"); ``constant`` keeps the scale.
    """
    s = config.guidance_scale
    if config.guidance_schedule == "increasing":
        return 1 + (s - 1) * (done + step) / total
    if config.guidance_schedule == "decreasing":
        return 1 + (s - 1) * (total - done) / total
    return s
