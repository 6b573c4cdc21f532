"""The four protocols that everything model-specific sits behind, and their check when a component is built.

The AE side (``Encoder``, ``Decoder``) and the AR side (``ARBackbone``, ``Sampler``) meet only at the latent:
a ``(B, C, h, w)`` tensor (C = 32 by default) and its normalisation. That is what makes any pairing possible,
a Qwen2.5-VL autoencoder with an InternVL3 language model included.

Components are ``torch.nn.Module`` objects. Images cross every boundary as float tensors in ``[-1, 1]``,
shape ``(B, 3, H, W)``; each encoder converts them to its VLM's own normalisation.

The registry builds every component through ``check_component``: a missing member, or a grid or width that
disagrees with what the component computes (a cheap probe on the smallest input, see ``check_component``), is a
``ContractError`` naming the plugin and the component at build time, not a reshape error at the first step.
``vgt_core.testing`` holds the fuller contract tests a plugin runs in its own test suite.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from vgt_core.errors import ContractError

if TYPE_CHECKING:
    from vgt_core.config import GenerationConfig
    from vgt_core.randomness import Draws, SampleDraws
    from vgt_core.sampling import PromptBatch, SamplerContext


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
    """A VLM's vision tower (and projector), returning the features its language model would see. (The
    transformers adapters convert [-1, 1] images to the tower's own input in a ``preprocess`` method; the core
    never calls it.)"""

    feature_dim: int
    image_size: int

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """Latent grid ``(h, w)`` for an input of this size (448 px -> 16 x 16 for InternVL3 and Qwen2.5-VL)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], ``(B, 3, H, W)`` -> features ``(B, h*w, feature_dim)`` in raster order."""


@runtime_checkable
class Decoder(Protocol):
    """A pixel decoder from ``latent_channels``-channel latents."""

    latent_channels: int
    upsample: int

    def forward(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` -> images in [-1, 1] of exactly ``size`` (resized if the native
        upsampling ``upsample`` differs, e.g. DC-AE's 32x to VGT's 28x)."""


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
        """An empty KV cache for generation (with a ``crop(n)`` method, as transformers' ``DynamicCache``). A backbone
        that can preallocate also takes ``new_cache(max_length=L)``: a cache for ``L`` positions written in place
        (``generation.cache_implementation: static``); the others are used with the dynamic cache only."""


@runtime_checkable
class Sampler(Protocol):
    """A generation scheme: the training sequence layout and the decoding loop.

    A sampler sees the generator only through a ``vgt_core.sampling.SamplerContext`` (the backbone, the position
    grid, the latent embedding, the flow head's sampler) and may use the helpers of ``vgt_core.sampling``.
    Optionally it has ``check_grid(grid, generation)`` (see ``GridChecking``)."""

    def setup(self, hidden_size: int, max_grid: int) -> None:
        """Create the sampler's own parameters (QueryAR's query grid, MAR's mask token) for an LM of width
        ``hidden_size`` and latent grids of up to ``max_grid x max_grid``; called once, by the generator's
        constructor, before anything else."""

    def training_targets(
        self,
        ctx: SamplerContext,
        tokens: torch.Tensor,
        grid: tuple[int, int],
        prompts: PromptBatch,
        draws: Draws | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lay out one training batch and run the backbone. ``tokens`` are clean latents ``(B, N, C)`` in
        raster order. Every random choice (orders, masks) must come from ``draws`` (``draws.rand(draws.per_sample(B),
        ...)``; ``GlobalDraws()`` when None), which in training gives each sample its own stream, so that a run on
        many processes computes what one process computes. Returns the backbone hidden states that condition the
        head ``(B, M, D)``, the raster index of the latent each must predict ``(B, M)`` (long) and a mask ``(B, M)``
        of the positions that count in the loss. The generator gathers the targets (and any per-position payload,
        e.g. REPA features)."""

    def generate(
        self,
        ctx: SamplerContext,
        prompts: PromptBatch,
        grid: tuple[int, int],
        config: GenerationConfig,
        rng: SampleDraws | torch.Generator,
    ) -> torch.Tensor:
        """Sample latent tokens ``(B, N, C)`` in raster order. ``rng`` is a ``SampleDraws`` with one generator per
        image (or, from older callers, one ``torch.Generator``): draw through ``decoding_orders(..., rng)`` and
        ``ctx.sample_tokens(..., rng)`` (or ``rng.generators[i]`` for image ``i``), never one stream shared by
        the batch, so that an image does not depend on the batch it is generated in."""


@runtime_checkable
class GridChecking(Protocol):
    """A sampler whose settings constrain the latent grid (QueryAR's group sizes must divide its tokens)."""

    def check_grid(self, grid: tuple[int, int], generation: dict[str, GenerationConfig] | None = None) -> None:
        """Raise ``ValueError`` naming the setting when the sampler cannot train on, or generate with each of
        ``generation`` (settings by their config key), a latent ``grid``; called before training starts."""


PROTOCOLS: dict[str, type] = {"encoder": Encoder, "decoder": Decoder, "backbone": ARBackbone, "sampler": Sampler}


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a protocol requires, in declaration order."""
    names = list(getattr(protocol, "__annotations__", {}))
    names += [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]
    return names


# -- the check at build time ------------------------------------------------------------------------------------


def check_component(kind: str, component: Any, who: str) -> None:
    """Raise ``ContractError`` (naming ``who``: the component and its plugin) unless ``component`` keeps the
    protocol of ``kind``; other kinds (datasets) are not checked.

    Members first; then a probe with no gradients, in eval mode (the component's train/eval flags are restored)
    and without drawing random numbers: an encoder reads a zero image of 2 x 2 latent cells (or,
    if it cannot, of its ``image_size``), a decoder decodes a
    2 x 3 zero latent, a backbone embeds one short prompt and runs one token through a fresh KV cache. These are
    the smallest inputs each accepts, so the probe costs little even for full-size models (a few hundred
    milliseconds on a CPU for InternViT-300M, one token for a billion-parameter LM)."""
    protocol = PROTOCOLS.get(kind)
    if protocol is None:
        return
    missing = [name for name in protocol_members(protocol) if not hasattr(component, name)]
    if missing:
        raise ContractError(
            f"{who}: {type(component).__name__} lacks {', '.join(missing)} of the {protocol.__name__} protocol "
            f"(vgt_core.protocols)"
        )
    probe = {"encoder": _probe_encoder, "decoder": _probe_decoder, "backbone": _probe_backbone}.get(kind)
    if probe is not None and isinstance(component, nn.Module) and not any(p.is_meta for p in component.parameters()):
        with _probing(component):  # (a component built on the meta device has no numbers to probe)
            probe(component, who)


@contextmanager
def _probing(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _placement(module: nn.Module) -> dict[str, Any]:
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    return {"device": param.device, "dtype": param.dtype} if param is not None else {}


def _positive_int(value: Any, name: str, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ContractError(f"{who}: {name} must be a positive int, got {value!r}")
    return value


def _run(who: str, what: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ContractError:
        raise
    except Exception as exc:  # a plugin's own bug: say whose, keep the cause
        raise ContractError(f"{who}: {what} failed: {type(exc).__name__}: {exc}") from exc


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _probe_encoder(encoder: Any, who: str) -> None:
    size = _positive_int(encoder.image_size, "image_size", who)
    feature_dim = _positive_int(encoder.feature_dim, "feature_dim", who)
    gh, gw = _run(who, f"grid({size})", encoder.grid, size)
    if gh < 1 or gw < 1:
        raise ContractError(f"{who}: grid({size}) = {(gh, gw)} is empty")
    # 2 x 2 latent cells, the smallest input, unless the encoder reads only its own size (CLIP's fixed positions)
    small = (2 * (size // gh), 2 * (size // gw))
    try:
        probe, features = small, _probe_forward(encoder, small)
    except Exception:  # noqa: BLE001 - retried at the configured size, whose failure is reported
        probe = (size, size)
        features = _run(who, f"a probe forward of a (1, 3, {size}, {size}) image", _probe_forward, encoder, probe)
    h, w = _run(who, f"grid({probe})", encoder.grid, probe)
    if _shape(features) != (1, h * w, feature_dim):
        raise ContractError(
            f"{who}: a {probe[0]}x{probe[1]} image gives features of shape {_shape(features)}, but grid({probe}) = "
            f"{(h, w)} and feature_dim = {feature_dim} promise (1, {h * w}, {feature_dim})"
        )


def _probe_forward(encoder: Any, size: tuple[int, int]) -> Any:
    return encoder(torch.zeros(1, 3, *size, **_placement(encoder)))


def _probe_decoder(decoder: Any, who: str) -> None:
    channels = _positive_int(decoder.latent_channels, "latent_channels", who)
    up = _positive_int(decoder.upsample, "upsample", who)
    size = (2 * up, 3 * up)
    z = torch.zeros(1, channels, 2, 3, **_placement(decoder))
    images = _run(who, f"a probe decode of a {tuple(z.shape)} latent", decoder, z, size)
    if _shape(images) != (1, 3, *size):
        raise ContractError(
            f"{who}: decoding a (1, {channels}, 2, 3) latent to size {size} gives {_shape(images)}, not (1, 3, {size[0]}, {size[1]})"
        )


def _probe_backbone(backbone: Any, who: str) -> None:
    d = _positive_int(backbone.hidden_size, "hidden_size", who)
    embeds, mask = _run(who, "embed_prompts(['a'])", backbone.embed_prompts, ["a"])
    if _shape(embeds)[::2] != (1, d) or _shape(mask) != _shape(embeds)[:2]:
        raise ContractError(
            f"{who}: embed_prompts(['a']) gives embeddings {_shape(embeds)} and mask {_shape(mask)}: expected "
            f"(1, T, {d}) (hidden_size = {d}) and (1, T)"
        )
    cache = _run(who, "new_cache()", backbone.new_cache)
    ids = torch.zeros(1, 1, dtype=torch.long, device=mask.device)
    hidden, _ = _run(who, "a forward of one token", backbone, embeds[:, -1:], mask[:, -1:], ids, cache)
    if _shape(hidden) != (1, 1, d):
        raise ContractError(f"{who}: a forward of one token gives hidden states {_shape(hidden)}, not (1, 1, {d})")
