"""The flow-matching head (paper §3.3) and its samplers.

Written here because no maintained library ships MAR/NextStep-1's per-token MLP head with adaLN: a small
MLP that predicts the velocity ``v(z_t, t, c)`` of one latent token from the LM's hidden state ``c``.
Convention: t = 0 is noise, t = 1 is data; ``z_t = t*z + (1-t)*eps`` and the target velocity is ``z - eps``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vgt_core.randomness import Draws, GlobalDraws


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal features of scalar times ``(M,)`` -> ``(M, dim)``, of ``scale * t``.

    Upstream's head (NextStep-1's SimpleMLPAdaLN) feeds t in [0, 1] as it is (scale 1); DiT-style heads feed
    t * 1000. The two are different functions: weights trained with one do not transfer to the other.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class _AdaLNBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class FlowHead(nn.Module):
    """v(x_t, t, c): input projection, ``depth`` adaLN residual blocks conditioned on time + c, final adaLN
    layer. Modulations and the output are zero-initialised, so the head starts by predicting 0."""

    def __init__(
        self,
        channels: int,
        cond_dim: int,
        width: int,
        depth: int,
        time_dim: int = 256,
        time_scale: float = 1.0,
        repa_dim: int | None = None,
        repa_depth: int | None = None,
        repa_hidden: int = 2048,
    ):
        super().__init__()
        self.time_dim, self.time_scale = time_dim, time_scale
        self.input_proj = nn.Linear(channels, width)
        self.time_embed = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(_AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, channels)
        # REPA (Yu et al., 2025): an MLP from a middle block's output to a frozen vision model's features
        self.repa_depth = min(depth, repa_depth or max(2, depth // 2)) if repa_dim else None
        self.repa_projector = (
            nn.Sequential(nn.Linear(width, repa_hidden), nn.SiLU(), nn.Linear(repa_hidden, repa_hidden), nn.SiLU(), nn.Linear(repa_hidden, repa_dim))
            if repa_dim
            else None
        )
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for m in (self.final_modulation[-1], self.final):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, t, cond)[0]

    def compile(self, **kwargs) -> None:
        """``torch.compile`` the head's per-token computation, ``forward_embedded``: training's loss and every
        solver step of generation run it, and neither goes through ``__call__``, the only thing
        ``nn.Module.compile`` compiles. ``kwargs`` go to ``torch.compile``; the weights and their names are
        unchanged. Compiling again replaces the compiled function (it always wraps the class's own)."""
        self.forward_embedded = torch.compile(type(self).forward_embedded.__get__(self), **kwargs)

    def forward_features(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The velocity and, with a REPA projector, the projected features of block ``repa_depth`` (else None)."""
        return self.forward_embedded(x, t, self.cond_embed(cond))

    def forward_embedded(
        self, x: torch.Tensor, t: torch.Tensor, cond_embedded: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward_features`` with the condition already through ``cond_embed``: a solver embeds it once per
        solve, not at each of its steps. ``t`` may be one time ``(1,)`` for every row."""
        y = self.time_embed(timestep_embedding(t, self.time_dim, scale=self.time_scale).to(x.dtype)) + cond_embedded
        h = self.input_proj(x)
        features = None
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, y)
            if i == self.repa_depth:
                features = self.repa_projector(h)
        shift, scale = self.final_modulation(y).chunk(2, dim=-1)
        return self.final(_modulate(self.final_norm(h), shift, scale)), features


def shift_noise_level(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift of a noise level sigma = 1 - t; shift > 1 spends more time near noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def dimension_adaptive_shift(tokens: int, channels: int, reference: int = 4096) -> float:
    """alpha = sqrt(m / n) with m = tokens * channels and n = 4096 (paper §3.3): sqrt(2) at 16x16x32."""
    return math.sqrt(tokens * channels / reference)


def flow_matching_loss(
    head: FlowHead,
    target: torch.Tensor,
    cond: torch.Tensor,
    *,
    shift: float = 1.0,
    batch_mul: int = 1,
    weight: torch.Tensor | None = None,
    repa_target: torch.Tensor | None = None,
    owner: torch.Tensor | None = None,
    draws: Draws | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean over tokens of ||(z - eps) - v(z_t, t, c)||^2 (averaged over channels), t logit-normal and shifted.

    ``target`` is ``(M, C)``, ``cond`` ``(M, D)``, ``weight`` ``(M,)`` selects the tokens that count.
    ``batch_mul`` draws several (t, eps) per token to amortise the LM's cost (MAR's diffusion_batch_mul).
    With ``repa_target`` ``(M, F)`` (a frozen vision model's feature of each token) it returns
    ``(flow loss, REPA loss)``, the REPA loss being the mean negative cosine between the head's projected
    features at z_t and the target, over the tokens that count (upstream's pretraining loss).
    ``owner`` ``(M,)`` names the sample of each token, so that ``draws`` gives every sample its own t and noise.
    """
    draws = draws if draws is not None else GlobalDraws()
    owner = owner if owner is not None else torch.zeros(target.shape[0], dtype=torch.long)
    if batch_mul > 1:
        target, cond = target.repeat(batch_mul, 1), cond.repeat(batch_mul, 1)
        weight = weight.repeat(batch_mul) if weight is not None else None
        repa_target = repa_target.repeat(batch_mul, 1) if repa_target is not None else None
        owner = owner.repeat(batch_mul)
    sigma = shift_noise_level(torch.sigmoid(draws.randn(owner, device=target.device)), shift)
    t = (1 - sigma)[:, None].to(target.dtype)
    eps = draws.randn(owner, target.shape[1], device=target.device, dtype=target.dtype)
    v, features = head.forward_features(t * target + (1 - t) * eps, t[:, 0], cond)
    loss = _token_mean((v.float() - (target - eps).float()).pow(2).mean(-1), weight)
    if repa_target is None:
        return loss
    if features is None:
        raise ValueError("a REPA target was given but the flow head has no REPA projector (set generator.repa_dim)")
    cosine = F.cosine_similarity(features.float(), repa_target.float(), dim=-1)
    return loss, _token_mean(-cosine, weight)


def _token_mean(per_token: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_token.mean()
    return (per_token * weight).sum() / weight.sum().clamp(min=1)


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def solve_flow(
    velocity: Velocity,
    noise: torch.Tensor,
    *,
    steps: int,
    solver: str = "euler",
    time_shift: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | Draws | None = None,
    owner: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from noise (t=0) to data (t=1) with ``steps`` velocity evaluations.

    ``euler``: the deterministic ODE. ``sde``: the Euler-Maruyama sampler of the released upstream code
    (drift v + (1-t) * score, diffusion sqrt(2(1-t)); the last 0.04 of time is one deterministic step).
    ``noise`` is standard normal; ``temperature`` scales it and the SDE's injected noise, drawn from
    ``generator``: one torch generator, or per-sample ``Draws`` where row ``r`` belongs to sample ``owner[r]``.
    """
    x = noise * temperature
    if solver == "euler":
        ts = 1 - shift_noise_level(1 - torch.linspace(0, 1, steps + 1, device=x.device), time_shift)
        for t0, t1 in zip(ts[:-1], ts[1:]):
            x = x + (t1 - t0) * velocity(x, t0.expand(x.shape[0]))
        return x
    if solver != "sde":
        raise ValueError(f"unknown solver {solver!r}; allowed: 'euler', 'sde'")
    last = 0.04
    ts = 1 - shift_noise_level(1 - torch.linspace(0, 1 - last, steps, device=x.device), time_shift)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        v = velocity(x, t0.expand(x.shape[0]))
        score = (t0 * v - x) / (1 - t0)
        dt = t1 - t0
        if isinstance(generator, Draws):
            eps = generator.randn(owner if owner is not None else generator.per_sample(x.shape[0]), *x.shape[1:]).to(x)
        else:
            eps = torch.randn(x.shape, generator=generator, device="cpu").to(x)
        x = x + (v + (1 - t0) * score) * dt + torch.sqrt(2 * (1 - t0) * dt) * eps * temperature
    t_end = ts[-1]
    return x + (1 - t_end) * velocity(x, t_end.expand(x.shape[0]))


def guided(head: FlowHead, cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> Velocity:
    """Classifier-free guidance on the velocity: v_u + scale * (v_c - v_u), both at the same x.

    The condition goes through the head's ``cond_embed`` once, here, instead of at every solver step; and when every
    row is at the same time (``solve_flow`` passes one time expanded over the rows, a stride-0 view), the time is
    embedded for one row and broadcast. Both give what ``head(x, t, cond)`` gives, with less work per step."""
    unguided = uncond is None or scale == 1.0
    embedded = head.cond_embed(cond if unguided else torch.cat([cond, uncond]))

    def one_time(t: torch.Tensor) -> torch.Tensor:
        return t[:1] if t.dim() == 1 and t.stride(0) == 0 else t

    if unguided:
        return lambda x, t: head.forward_embedded(x, one_time(t), embedded)[0]

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = one_time(t)
        v = head.forward_embedded(torch.cat([x, x]), t if t.shape[0] == 1 else torch.cat([t, t]), embedded)[0]
        v_c, v_u = v.chunk(2)
        return v_u + scale * (v_c - v_u)

    return velocity
