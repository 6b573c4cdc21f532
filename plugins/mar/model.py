"""MAR (Li et al., 2024, arXiv 2406.11838) on the VLM's language model: the paper's baseline (Table 8).

The image part attends bidirectionally: every image token sees the prompt and every other image token. In
training a random subset (MAR's mask ratio, truncated normal on [min, 1] around 1) is replaced by a learnable
mask token and predicted through the same flow head. Generation reveals tokens in a random order over
``num_iter`` steps with MAR's cosine schedule. Bidirectional attention rules out a KV cache for the image,
but the prompt never sees the image, so its keys and values are computed once and reused every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vgt_core.config import GenerationConfig
from vgt_core.sampling import PromptBatch, SamplerContext, decoding_orders, guidance_at, new_cache, position_ids_from
from vgt_core.randomness import Draws, GlobalDraws, SampleDraws
from vgt_plugins.mar import MAROptions


def image_attention_mask(prompt_mask: torch.Tensor, image_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(R, 1, N, T + N)`` for image queries: all real prompt keys and all image keys."""
    rows = prompt_mask.shape[0]
    keys = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(rows, image_tokens).bool()], dim=1)
    blocked = torch.zeros(keys.shape, dtype=dtype, device=prompt_mask.device).masked_fill(~keys, torch.finfo(dtype).min)
    return blocked[:, None, None, :].expand(rows, 1, image_tokens, keys.shape[1])


def full_attention_mask(prompt_mask: torch.Tensor, image_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(R, 1, T + N, T + N)``: the prompt causal (and blind to the image), the image as above."""
    rows, t = prompt_mask.shape
    keys = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(rows, image_tokens).bool()], dim=1)
    allowed = torch.ones(t + image_tokens, t + image_tokens, dtype=torch.bool, device=prompt_mask.device).tril()
    allowed[t:, t:] = True
    allowed = allowed[None] & keys[:, None, :]
    allowed |= torch.eye(t + image_tokens, dtype=torch.bool, device=prompt_mask.device)[None]  # no empty rows (padding)
    return torch.zeros(allowed.shape, dtype=dtype, device=prompt_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def revealed_after(step: int, num_iter: int, total: int, done: int) -> int:
    """MAR's cosine schedule: tokens known after ``step`` (0-based) of ``num_iter`` when ``done`` are known;
    every step reveals at least one token and the last reveals the rest."""
    if step + 1 >= num_iter:
        return total
    still_masked = math.floor(total * math.cos(math.pi / 2 * (step + 1) / num_iter))
    return min(total, max(total - still_masked, done + 1))


def truncated_normal(uniform: torch.Tensor, mean: float, std: float, low: float, high: float) -> torch.Tensor:
    """Uniform draws in [0, 1) -> N(mean, std) truncated to [low, high], by the inverse CDF (MAR's mask ratio;
    the same method as ``nn.init.trunc_normal_``, but from given draws so that each sample has its own)."""
    cdf = lambda x: 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))  # noqa: E731
    lo, hi = cdf(low), cdf(high)
    p = (lo + (hi - lo) * uniform.double()).clamp(1e-12, 1 - 1e-12)
    return (mean + std * math.sqrt(2) * torch.erfinv(2 * p - 1)).clamp(low, high).to(uniform.dtype)


class MAR(nn.Module):
    def __init__(self, options: MAROptions):
        super().__init__()
        self.options = options

    def setup(self, hidden_size: int, max_grid: int) -> None:
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.normal_(self.mask_token, std=0.02)

    def _image_inputs(self, ctx: SamplerContext, tokens: torch.Tensor, known: torch.Tensor, grid) -> torch.Tensor:
        positions = ctx.positions(grid)
        latents = ctx.embed_latents(tokens)
        return torch.where(known[..., None], latents, self.mask_token.to(latents.dtype)) + positions

    def training_targets(self, ctx: SamplerContext, tokens: torch.Tensor, grid, prompts: PromptBatch, draws: Draws | None = None):
        draws = draws if draws is not None else GlobalDraws()
        b, n, _ = tokens.shape
        ratio = truncated_normal(draws.rand(draws.per_sample(b), device=tokens.device), 1.0, self.options.mask_ratio_std, self.options.mask_ratio_min, 1.0)
        n_masked = (ratio * n).ceil().clamp(1, n)
        rank = draws.rand(draws.per_sample(b), n, device=tokens.device).argsort(-1).argsort(-1)
        masked = rank < n_masked[:, None]
        image = self._image_inputs(ctx, tokens, ~masked, grid)
        embeds = torch.cat([prompts.embeds, image], dim=1)
        mask2d = torch.cat([prompts.mask, prompts.mask.new_ones(b, n)], dim=1)
        attention = full_attention_mask(prompts.mask, n, embeds.dtype)
        hidden, _ = ctx.backbone(embeds, attention, position_ids_from(mask2d))
        return hidden[:, prompts.embeds.shape[1] :], torch.arange(n, device=tokens.device).expand(b, n), masked.float()

    @torch.no_grad()
    def generate(self, ctx: SamplerContext, prompts: PromptBatch, grid, config: GenerationConfig, rng: torch.Generator | SampleDraws):
        rows, n, device = prompts.embeds.shape[0], grid[0] * grid[1], prompts.embeds.device
        per_step = config.tokens_per_step if isinstance(config.tokens_per_step, int) else max(config.tokens_per_step)
        num_iter = config.num_iter or math.ceil(n / per_step)
        order, order_rows = decoding_orders(prompts, grid, config.order, rng)
        b = order.shape[0]

        backbone = ctx.backbone
        t = prompts.embeds.shape[1]
        cache = new_cache(backbone, config, t + n)  # the prompt's keys, and one step's image keys at a time
        backbone(prompts.embeds, prompts.mask, position_ids_from(prompts.mask), cache)  # the prompt, once
        image_positions = prompts.mask.sum(-1, keepdim=True) + torch.arange(n, device=device)
        attention = image_attention_mask(prompts.mask, n, prompts.embeds.dtype)

        tokens = torch.zeros(rows, n, ctx.latent_channels, device=device, dtype=prompts.embeds.dtype)
        known = torch.zeros(rows, n, dtype=torch.bool, device=device)
        done = 0
        for step in range(num_iter):
            if done == n:
                break
            upto = revealed_after(step, num_iter, n, done)
            hidden, cache = backbone(self._image_inputs(ctx, tokens, known, grid), attention, image_positions, cache)
            cache.crop(-n)  # forget this step's image keys: only the prompt's stay
            idx = order_rows[:, done:upto]
            picked = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
            z = ctx.sample_tokens(picked, prompts, config, guidance_at(config, done, upto - done, n), rng)
            z_rows = torch.cat([z, z]) if prompts.guided else z
            tokens.scatter_(1, idx[..., None].expand(-1, -1, z.shape[-1]), z_rows.to(tokens.dtype))
            known.scatter_(1, idx, True)
            done = upto
        return tokens[:b]
