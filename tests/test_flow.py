"""The flow-matching head learns distributions; its solvers and guidance behave as documented."""

from __future__ import annotations

import math

import torch

from vgt_core.flow import FlowHead, dimension_adaptive_shift, flow_matching_loss, guided, shift_noise_level, solve_flow

MODES = torch.tensor([[[2.0, 2.0], [-2.0, -2.0]], [[2.0, -2.0], [-2.0, 2.0]]])  # two mixtures, chosen by c


def sample_mixture(cls: torch.Tensor) -> torch.Tensor:
    pick = torch.randint(0, 2, cls.shape)
    return MODES[cls, pick] + 0.1 * torch.randn(cls.shape[0], 2)


def train_head(steps: int = 1500) -> FlowHead:
    torch.manual_seed(0)
    head = FlowHead(channels=2, cond_dim=2, width=64, depth=3)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(steps):
        cls = torch.randint(0, 2, (256,))
        loss = flow_matching_loss(head, sample_mixture(cls), torch.nn.functional.one_hot(cls, 2).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def mixture_fit(head: FlowHead, cls: int, solver: str) -> tuple[float, float]:
    """(fraction of samples within 0.5 of a mode of mixture ``cls``, balance between its two modes)."""
    cond = torch.nn.functional.one_hot(torch.full((2000,), cls), 2).float()
    x = solve_flow(guided(head, cond, None, 1.0), torch.randn(2000, 2), steps=40, solver=solver, generator=torch.Generator().manual_seed(0))
    dist = torch.cdist(x, MODES[cls])  # (2000, 2)
    near = dist.min(1).values < 0.5
    share = (dist.argmin(1)[near] == 0).float().mean().item()
    return near.float().mean().item(), share


def test_head_learns_a_conditional_gaussian_mixture():
    head = train_head()
    for cls in (0, 1):
        for solver in ("euler", "sde"):
            near, share = mixture_fit(head, cls, solver)
            assert near > 0.9, (cls, solver, near)  # samples sit on the right modes (the other mixture's are far)
            assert 0.35 < share < 0.65, (cls, solver, share)  # both modes, in their 50/50 proportion


def test_an_untrained_head_does_not_fit():
    near, _ = mixture_fit(FlowHead(channels=2, cond_dim=2, width=64, depth=3), 0, "euler")
    assert near < 0.3  # the statistic above fails a broken head


def test_guidance_scale_one_is_the_conditional_velocity_and_zero_the_unconditional():
    torch.manual_seed(0)
    head = FlowHead(4, 3, 16, 2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, t = torch.randn(5, 4), torch.rand(5)
    c, u = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(guided(head, c, u, 1.0)(x, t), head(x, t, c))
    torch.testing.assert_close(guided(head, c, u, 1.0 + 1e-9)(x, t), head(x, t, c), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(guided(head, c, u, 0.0)(x, t), head(x, t, u), atol=1e-6, rtol=1e-5)
    v3 = guided(head, c, u, 3.0)(x, t)
    torch.testing.assert_close(v3, head(x, t, u) + 3 * (head(x, t, c) - head(x, t, u)), atol=1e-5, rtol=1e-5)
    # one time for every row (as solve_flow passes it, a stride-0 view): embedded once, the same velocities
    same = torch.tensor(0.3).expand(5)
    for s in (1.0, 3.0):
        expected = head(x, same.clone(), u) + s * (head(x, same.clone(), c) - head(x, same.clone(), u))
        torch.testing.assert_close(guided(head, c, u, s)(x, same), expected, atol=1e-5, rtol=1e-5)


def test_euler_solver_is_exact_for_a_constant_velocity_and_temperature_scales_noise():
    noise = torch.randn(7, 3)
    target = torch.randn(7, 3)
    x = solve_flow(lambda x, t: target, noise, steps=5, temperature=0.5)
    torch.testing.assert_close(x, 0.5 * noise + target)


def test_dimension_adaptive_shift():
    assert math.isclose(dimension_adaptive_shift(16 * 16, 32), math.sqrt(2))
    sigma = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(shift_noise_level(sigma, 1.0), sigma)
    assert shift_noise_level(torch.tensor(0.5), 3.0) > 0.5  # shift > 1 pushes towards noise
