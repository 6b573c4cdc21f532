"""VGT-AR (paper §3.3): the VLM's language model predicts VGT-AE latents through a sampler (QueryAR, MAR)
and a flow-matching head.

Laid out as the released upstream model, so that its checkpoints can be mapped onto it:
    latent token   = latent_in(z_i) + P_i          (latent_in: Linear(C -> D); P: learnable position grid)
    condition c_i  = latent_out(hidden state read for position i)   (Linear(D -> D))
    head           = FlowHead(C, D, width, depth)
Grids are learnable ``(1, D, G, G)`` maps center-cropped to the latent's ``h x w``, so any latent up to
``max_grid`` works. The sampler owns its own parameters (QueryAR's query grid, MAR's mask token).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vgt_core.config import GenerationConfig, GeneratorOptions, LatentNorm
from vgt_core.randomness import Draws, GlobalDraws, SampleDraws, sample_generator
from vgt_core.flow import FlowHead, dimension_adaptive_shift, flow_matching_loss, guided, solve_flow
# the sampler toolkit, re-exported here for code written before it had a module of its own
from vgt_core.sampling import (  # noqa: F401
    PromptBatch,
    SamplerContext,
    center_crop,
    decoding_orders,
    guidance_at,
    position_ids_from,
)
from vgt_core.serialization import WEIGHTS_NAME, atomic_folder, load_weights, read_model_config, write_model_folder

FORMAT = "vgt-generator"


def image_draws(seed: int, first: int, count: int) -> SampleDraws:
    """One generator per image for images ``first .. first + count - 1`` of a call: image ``i`` draws its order
    and all its noise from a generator seeded from ``seed + i`` alone, so its result does not depend on the batch it
    is generated in, and image ``i`` of a call with seed ``s`` is the image of that prompt alone with seed ``s + i``."""
    return SampleDraws([sample_generator(seed + first + i, "generate", 0, 0) for i in range(count)])


def _gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens`` ``(B, N, F)`` at raster positions ``index`` ``(B, M)`` -> ``(B, M, F)``."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


class VGTGenerator(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        sampler: nn.Module,
        *,
        backbone_spec: dict,
        sampler_spec: dict,
        latent_channels: int = 32,
        latent_norm: LatentNorm = "layernorm",
        options: GeneratorOptions | None = None,
    ):
        super().__init__()
        options = options or GeneratorOptions()
        d = backbone.hidden_size
        self.backbone = backbone
        self.sampler = sampler
        self.options = options
        self.backbone_spec, self.sampler_spec = backbone_spec, sampler_spec
        self.latent_channels = latent_channels
        self.latent_norm = latent_norm
        self.latent_in = nn.Linear(latent_channels, d)
        self.position_grid = nn.Parameter(torch.empty(1, d, options.max_grid, options.max_grid))
        self.latent_out = nn.Linear(d, d)
        self.head = FlowHead(
            latent_channels,
            d,
            options.head_width,
            options.head_depth,
            time_scale=options.head_time_scale,
            repa_dim=options.repa_dim,
            repa_depth=options.repa_depth,
            repa_hidden=options.repa_projector_dim,
        )
        for linear in (self.latent_in, self.latent_out):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        nn.init.trunc_normal_(self.position_grid, std=0.02)
        sampler.setup(d, options.max_grid)

    @classmethod
    def from_specs(
        cls,
        backbone: dict,
        sampler: dict,
        *,
        latent_channels: int = 32,
        latent_norm: LatentNorm = "layernorm",
        options: GeneratorOptions | dict | None = None,
    ) -> VGTGenerator:
        from vgt_core.plugins import registry

        reg = registry()
        return cls(
            reg.build("backbone", backbone["name"], backbone.get("options")),
            reg.build("sampler", sampler["name"], sampler.get("options")),
            backbone_spec=dict(backbone),
            sampler_spec=dict(sampler),
            latent_channels=latent_channels,
            latent_norm=latent_norm,
            options=GeneratorOptions.model_validate(options or {}),
        )

    # -- pieces the samplers use (through ``sampler_context``) ---------------------------------------------------

    def sampler_context(self) -> SamplerContext:
        """The narrow view of this generator a sampler is given (``vgt_core.sampling``)."""
        return SamplerContext(self.backbone, self.latent_channels, self.positions, self.embed_latents, self.sample_tokens)

    @property
    def output_layers(self) -> list[nn.Module]:
        """The layers that write the model's output (the flow head's last layer): Muon leaves them to AdamW, as it
        does the embeddings (``vgt_core.training.muon.hidden_matrices``)."""
        return [self.head.final]

    @property
    def device(self) -> torch.device:
        return self.latent_in.weight.device

    def positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings ``(h*w, D)`` of the latent grid, raster order."""
        return center_crop(self.position_grid, grid)

    def embed_latents(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """LM inputs for latent tokens ``(R, n, C)``, at embedded ``positions`` ``(R, n, D)`` when given."""
        embedded = self.latent_in(tokens)
        return embedded if positions is None else embedded + positions

    def renormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Sampled latents back onto the AE's latent manifold (per-token LayerNorm when the AE uses it)."""
        if self.latent_norm == "layernorm":
            return torch.nn.functional.layer_norm(tokens, (self.latent_channels,), eps=1e-6)
        return tokens

    def prompt_limit(self, image_tokens: int) -> int | None:
        """Most prompt tokens a sequence may hold: ``max_prompt_tokens``, and no more than the language model's
        positions leave after the image (``2 * image_tokens`` slots at most, QueryAR's [Q, z] pairs, and the
        image-start token), so that a long prompt is cut -- with the backbone's warning, which names the
        limit -- and never runs the LM past the positions it was trained on."""
        limit = self.options.max_prompt_tokens
        config = getattr(getattr(self.backbone, "lm", self.backbone), "config", None)
        positions = getattr(config, "max_position_embeddings", None)
        if isinstance(positions, int) and image_tokens:
            room = positions - 2 * image_tokens - 1
            if room < 1:
                raise ValueError(
                    f"a latent grid of {image_tokens} tokens needs {2 * image_tokens + 2} positions, and the language "
                    f"model has {positions} (max_position_embeddings)"
                )
            limit = room if limit is None else min(limit, room)
        return limit

    def embed_prompts(
        self, captions: list[str], uncond: torch.Tensor | None = None, guided: bool = False, image_tokens: int = 0
    ) -> PromptBatch:
        """Captions through the prompt template; rows flagged in ``uncond`` (training dropout) get the
        unconditioned prompt; ``guided`` appends an unconditioned row per caption for CFG. Prompts longer than
        ``prompt_limit(image_tokens)`` are cut, with a warning."""
        texts = [
            self.options.uncond_prompt if uncond is not None and bool(uncond[i]) else self.options.prompt_template.format(caption=c)
            for i, c in enumerate(captions)
        ]
        if guided:
            texts += [self.options.uncond_prompt] * len(captions)
        embeds, mask = self.backbone.embed_prompts(texts, max_tokens=self.prompt_limit(image_tokens))
        return PromptBatch(embeds, mask, guided)

    def sample_tokens(
        self,
        hidden: torch.Tensor,
        prompts: PromptBatch,
        config: GenerationConfig,
        scale: float,
        generator: torch.Generator | SampleDraws,
    ) -> torch.Tensor:
        """Solve the flow head for every token whose LM state is in ``hidden`` ``(R, m, D)``; with CFG the
        rows are [cond, uncond] and the result has R/2 rows. Returns renormalised latents ``(B, m, C)``.
        With ``SampleDraws`` (one generator per image) each image's noise comes from its own generator."""
        cond = self.latent_out(hidden)
        rows, m, d = cond.shape
        if prompts.guided:
            c, u = cond[: rows // 2].reshape(-1, d), cond[rows // 2 :].reshape(-1, d)
        else:
            c, u = cond.reshape(-1, d), None
        owner = torch.arange(c.shape[0] // m).repeat_interleave(m)  # image of each row (rows are image-major)
        if isinstance(generator, SampleDraws):
            noise = generator.randn(owner, self.latent_channels).to(c)
        else:
            noise = torch.randn((c.shape[0], self.latent_channels), generator=generator).to(c)
        x = solve_flow(
            guided(self.head, c, u, scale),
            noise,
            steps=config.num_sampling_steps,
            solver=config.solver,
            time_shift=config.time_shift,
            temperature=config.temperature,
            generator=generator,
            owner=owner,
        )
        return self.renormalize(x.reshape(-1, m, self.latent_channels))

    def compile(self, **kwargs) -> None:
        """``torch.compile`` what runs per training step and per generation step: the language model (its
        ``__call__``) and the flow head's per-token computation (``FlowHead.compile``). The rest stays eager on
        purpose: prompt tokenisation, the random orders and per-image draws, and the sampler's Python loop over LM
        passes and solver steps. ``kwargs`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``); ``dynamic``
        defaults to True because generation's shapes change by design (the KV cache grows every pass, m varies,
        CFG doubles the rows): specialised, the language model recompiled on each new cache length until dynamo's
        recompile limit (8) left it eager, measured on bench/compile.py's settings. The first calls compile (tens of
        seconds on a CPU); weights, state-dict names and results (to float rounding) are unchanged. Measured:
        docs/benchmarks.md#torchcompile-benchcompilepy."""
        kwargs.setdefault("dynamic", True)
        self.backbone.compile(**kwargs)
        self.head.compile(**kwargs)

    # -- training and generation ---------------------------------------------------------------------------------

    def training_shift(self, grid: tuple[int, int]) -> float:
        if self.options.time_shift == "auto":
            return dimension_adaptive_shift(grid[0] * grid[1], self.latent_channels)
        return float(self.options.time_shift)

    def forward(
        self,
        latents: torch.Tensor,
        captions: list[str],
        uncond: torch.Tensor | None = None,
        repa_features: torch.Tensor | None = None,
        draws: Draws | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The flow-matching loss of a batch of clean latents ``(B, C, h, w)`` given their captions; with
        ``repa_features`` ``(B, N, F)`` (a frozen vision model's features per latent position, raster order)
        also the REPA loss, as ``(flow loss, REPA loss)``. Random numbers (order, timesteps, noise) come from
        ``draws`` (per sample in training, so a distributed run computes what one process would)."""
        draws = draws if draws is not None else GlobalDraws()
        grid = tuple(latents.shape[-2:])
        tokens = latents.flatten(2).transpose(1, 2)  # (B, N, C), raster order
        prompts = self.embed_prompts(captions, uncond, image_tokens=tokens.shape[1])
        hidden, index, weight = self.sampler.training_targets(self.sampler_context(), tokens, grid, prompts, draws=draws)
        targets = _gather_tokens(tokens, index)
        repa_target = None
        if repa_features is not None:
            repa_target = _gather_tokens(repa_features, index).reshape(-1, repa_features.shape[-1])
        return flow_matching_loss(
            self.head,
            targets.reshape(-1, self.latent_channels),
            self.latent_out(hidden).reshape(-1, hidden.shape[-1]),
            shift=self.training_shift(grid),
            batch_mul=self.options.head_batch_mul,
            weight=weight.reshape(-1).to(targets.dtype),
            owner=torch.arange(tokens.shape[0]).repeat_interleave(index.shape[1]),
            draws=draws,
            repa_target=repa_target,
        )

    @torch.no_grad()
    def generate(
        self,
        captions: list[str],
        grid: tuple[int, int],
        config: GenerationConfig | None = None,
        generator: torch.Generator | SampleDraws | None = None,
    ) -> torch.Tensor:
        """Latents ``(B, C, h, w)`` for ``captions``. By default caption ``i`` draws from its own generator seeded
        from ``config.seed + i`` (``image_draws``): the same seed gives the same latents for a caption whatever
        else is in the batch. A single ``torch.Generator`` shared by the batch is still accepted."""
        config = config or GenerationConfig()
        if generator is None:
            seed = config.seed if config.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
            generator = image_draws(seed, 0, len(captions))
        use_cfg = config.guidance_scale != 1.0
        prompts = self.embed_prompts(captions, guided=use_cfg, image_tokens=grid[0] * grid[1])
        tokens = self.sampler.generate(self.sampler_context(), prompts, grid, config, generator)
        return tokens.transpose(1, 2).reshape(len(captions), self.latent_channels, *grid)

    # -- persistence --------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "backbone": self.backbone_spec,
            "sampler": self.sampler_spec,
            "latent_channels": self.latent_channels,
            "latent_norm": self.latent_norm,
            "options": self.options.model_dump(mode="json"),
        }

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        with atomic_folder(folder) as tmp:
            self.write_into(tmp)

    def write_into(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        write_model_folder(folder, self, self.config(), {"backbone": self.backbone}, state=state)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> VGTGenerator:
        folder = Path(folder)
        config, specs = read_model_config(folder, FORMAT, "VGT generator", ("backbone",))
        backbone = specs["backbone"]
        # folders written before the option existed were trained with the head embedding 1000 * t
        config["options"].setdefault("head_time_scale", 1000.0)
        model = cls.from_specs(
            backbone,
            config["sampler"],
            latent_channels=config["latent_channels"],
            latent_norm=config["latent_norm"],
            options=config["options"],
        )
        model.backbone_spec = config["backbone"]
        load_weights(model, folder / WEIGHTS_NAME)
        return model.to(map_location).eval()
