"""QueryAR (paper §3.3): position queries interleaved with latents in a random order, decoded causally.

Training sequence, per sample, with a fresh random order pi:
    [prompt ..., Q_pi(1), z_pi(1), Q_pi(2), z_pi(2), ...]        (Q_i = query_i + P_i, z_i = latent_in(z_i) + P_i)
and the hidden state at Q_pi(k) predicts z_pi(k). Generation with m tokens per step feeds, in one LM pass,
the m latents drawn in the previous step and the next m queries, using the LM's KV cache:
    [prompt, Q_g1] -> z_g1;  [z_g1, Q_g2] -> z_g2;  ...      (N/m passes)
so each group of queries sees the earlier groups' queries and latents, but not each other's latents.
Upstream's released code lays out m > 1 differently (``generation.parallel_layout: upstream``): it feeds the
last group's queries again, each followed by its latent, before the next queries:
    [prompt, Q_g1] -> z_g1;  [Q_g1,1, z_g1,1, ..., Q_g1,m, z_g1,m, Q_g2] -> z_g2;  ...
and splits N tokens into N // m steps with the remainder spread over the first (``step_split: balanced``).

Upstream trains on single [Q, z] pairs only, so at m > 1 the model meets m queries in a row that it never
saw in training. ``train_group_sizes`` also shows it groups [Q_g (m queries), z_g (m latents)], the exact
layout generation uses; with [1] (the default) training is upstream's.

``position_ids`` chooses the RoPE position of image slots: ``sequence`` (upstream) counts them along the sequence,
so in a random order the offset between a query and an earlier latent is random; ``grid`` gives the query and
the latent of grid position i both ``len(prompt) + i``, so attention sees where the latents sit in the image.
"""

from __future__ import annotations

import torch
from torch import nn

from vgt_core.config import GenerationConfig
from vgt_core.sampling import PromptBatch, SamplerContext, center_crop, decoding_orders, guidance_at, new_cache, position_ids_from
from vgt_core.randomness import Draws, GlobalDraws, SampleDraws
from vgt_plugins.queryar import QueryAROptions


def step_sizes(total: int, tokens_per_step: int | list[int], split: str = "fixed") -> list[int]:
    """How many tokens each generation step samples, or an explicit schedule that must add up to the number
    of tokens. ``fixed``: ``m`` a step, the last step takes the rest; ``balanced`` (upstream's scheduler):
    ``total // m`` steps of near-equal size, the larger ones first."""
    if isinstance(tokens_per_step, int):
        if tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
        if split == "balanced":
            steps = max(1, total // tokens_per_step)
            base, rest = divmod(total, steps)
            return [base + 1] * rest + [base] * (steps - rest)
        if split != "fixed":
            raise ValueError(f"unknown step_split {split!r}; allowed: 'fixed', 'balanced'")
        full, rest = divmod(total, tokens_per_step)
        return [tokens_per_step] * full + ([rest] if rest else [])
    if sum(tokens_per_step) != total or min(tokens_per_step) < 1:
        raise ValueError(f"tokens_per_step schedule {tokens_per_step} must be positive and add up to {total} tokens")
    return list(tokens_per_step)


class QueryAR(nn.Module):
    def __init__(self, options: QueryAROptions):
        super().__init__()
        self.options = options

    def setup(self, hidden_size: int, max_grid: int) -> None:
        """The learnable query grid, upstream's ``max_metaquery`` (init N(0, 1/sqrt(D)))."""
        self.query_grid = nn.Parameter(torch.randn(1, hidden_size, max_grid, max_grid) * hidden_size**-0.5)

    def check_grid(self, grid: tuple[int, int], generation: dict[str, GenerationConfig] | None = None) -> None:
        """Training lays out groups of ``m`` queries for every size in ``train_group_sizes``: each must divide the
        latent grid's token count; a ``tokens_per_step`` schedule of ``generation`` (settings by their key) must add
        up to it. Checked when training starts, before the first step, not at the first sample or the end."""
        n = grid[0] * grid[1]
        for key, config in (generation or {}).items():
            try:
                step_sizes(n, config.tokens_per_step, config.step_split)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc} (the {grid[0]}x{grid[1]} latent grid)") from None
        bad = [m for m in self.options.train_group_sizes if n % m]
        if bad:
            fits = [m for m in range(1, n + 1) if n % m == 0]
            raise ValueError(
                f"sampler.options.train_group_sizes {self.options.train_group_sizes}: {bad} do not divide the "
                f"{n} tokens of the {grid[0]}x{grid[1]} latent grid; choose among {fits} "
                f"(--set sampler.options.train_group_sizes=[...])"
            )

    def queries(self, ctx: SamplerContext, grid: tuple[int, int]) -> torch.Tensor:
        return center_crop(self.query_grid, grid) + ctx.positions(grid)  # (N, D)

    # -- training -----------------------------------------------------------------------------------------------

    def _layout(self, order: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of the image part for groups of ``group`` positions: position index and is-query flag,
        each ``(rows, 2N)``: [Q_g, z_g] for every group g of the order."""
        rows, n = order.shape
        g = order.reshape(rows, n // group, 1, group).expand(rows, n // group, 2, group)
        is_query = torch.tensor([True, False], device=order.device).view(1, 1, 2, 1).expand_as(g)
        return g.reshape(rows, 2 * n), is_query.reshape(rows, 2 * n)

    def training_targets(self, ctx: SamplerContext, tokens: torch.Tensor, grid, prompts: PromptBatch, draws: Draws | None = None):
        draws = draws if draws is not None else GlobalDraws()
        b, n, _ = tokens.shape
        sizes = self.options.train_group_sizes
        if any(n % m for m in sizes):
            raise ValueError(f"train_group_sizes {sizes} must divide the {n} latent tokens")
        device = tokens.device
        if self.options.train_order == "raster":
            order = torch.arange(n, device=device).expand(b, n)
        else:
            order = draws.rand(draws.per_sample(b), n, device=device).argsort(-1)
        pick = (draws.rand(draws.per_sample(b)) * len(sizes)).long().clamp(max=len(sizes) - 1)
        group = torch.tensor(sizes, device=device)[pick.to(device)]
        slot_pos = torch.empty(b, 2 * n, dtype=torch.long, device=device)
        slot_query = torch.empty(b, 2 * n, dtype=torch.bool, device=device)
        for m in group.unique().tolist():
            rows = group == m
            slot_pos[rows], slot_query[rows] = self._layout(order[rows], m)

        positions = ctx.positions(grid)  # (N, D)
        queries = self.queries(ctx, grid)
        latents = ctx.embed_latents(tokens, positions)  # (B, N, D)
        picked = latents.gather(1, slot_pos[..., None].expand(-1, -1, latents.shape[-1]))
        image = torch.where(slot_query[..., None], queries[slot_pos], picked)

        embeds = torch.cat([prompts.embeds, image], dim=1)
        mask = torch.cat([prompts.mask, torch.ones(b, 2 * n, dtype=prompts.mask.dtype, device=device)], dim=1)
        ids = torch.cat([position_ids_from(prompts.mask), self._image_ids(prompts, 0, slot_pos)], dim=1)
        hidden, _ = ctx.backbone(embeds, mask, ids)
        hidden = hidden[:, prompts.embeds.shape[1] :]
        read = hidden[slot_query].view(b, n, -1)  # the state at each query, in sequence order
        return read, slot_pos[slot_query].view(b, n), torch.ones(b, n, device=device)

    def _image_ids(self, prompts: PromptBatch, fed: int, grid_index: torch.Tensor) -> torch.Tensor:
        """RoPE positions of the next image slots, ``(R, k)``, right after each row's text: slots ``fed`` to
        ``fed + k - 1`` of the image part (``sequence``), or their raster indices ``grid_index`` (``grid``), so
        that a query and the latents around it keep the offsets the VLM saw between image tokens, in any order."""
        text = prompts.mask.sum(1, keepdim=True)
        if self.options.position_ids == "grid":
            return text + grid_index
        return text + fed + torch.arange(grid_index.shape[1], device=grid_index.device)

    # -- generation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, ctx: SamplerContext, prompts: PromptBatch, grid, config: GenerationConfig, rng: torch.Generator | SampleDraws):
        rows, n, device = prompts.embeds.shape[0], grid[0] * grid[1], prompts.embeds.device
        order, order_rows = decoding_orders(prompts, grid, config.order, rng)
        b = order.shape[0]
        positions, queries = ctx.positions(grid), self.queries(ctx, grid)
        backbone = ctx.backbone

        out = torch.zeros(b, n, ctx.latent_channels, device=device, dtype=positions.dtype)
        mask, sequence = prompts.mask, prompts.embeds
        ids = position_ids_from(mask)
        sizes = step_sizes(n, config.tokens_per_step, config.step_split)
        # upstream's layout at m > 1 feeds the last step's queries again, each followed by its latent
        interleave = config.parallel_layout == "upstream" and max(sizes) > 1
        # every slot fed: each step's queries, and the previous step's latents (with its queries again, upstream's)
        slots = n + (1 + interleave) * (n - sizes[-1])
        cache = new_cache(backbone, config, prompts.embeds.shape[1] + slots) if config.use_cache else None
        pending: torch.Tensor | None = None  # the slots of the last step, not yet fed to the LM
        pending_idx = order_rows[:, :0]
        done = fed = 0  # tokens drawn; image slots given to the LM
        for step, m in enumerate(sizes):
            idx = order_rows[:, done : done + m]
            new = queries[idx]  # (rows, m, D)
            if pending is not None:
                new = torch.cat([pending, new], dim=1)
            mask = torch.cat([mask, torch.ones(rows, new.shape[1], dtype=mask.dtype, device=device)], dim=1)
            ids = torch.cat([ids, self._image_ids(prompts, fed, torch.cat([pending_idx, idx], dim=1))], dim=1)
            fed += new.shape[1]
            if cache is not None:
                inputs = new if done else torch.cat([prompts.embeds, new], dim=1)
                hidden, cache = backbone(inputs, mask, ids[:, -inputs.shape[1] :], cache)
            else:  # reference path: the whole sequence again, every step
                sequence = torch.cat([sequence, new], dim=1)
                hidden, _ = backbone(sequence, mask, ids)
            # guidance follows the steps, as upstream's schedule does (equal to a token count when steps are equal)
            z = ctx.sample_tokens(hidden[:, -m:], prompts, config, guidance_at(config, step, 1, len(sizes)), rng)
            out.scatter_(1, order[:, done : done + m, None].expand(-1, -1, z.shape[-1]), z.to(out.dtype))
            z_rows = torch.cat([z, z]) if prompts.guided else z
            pending, pending_idx = ctx.embed_latents(z_rows, positions[idx]), idx
            if interleave:
                pending = torch.stack([queries[idx], pending], dim=2).flatten(1, 2)  # [Q1, z1, Q2, z2, ...]
                pending_idx = idx.repeat_interleave(2, dim=1)
            done += m
        return out
