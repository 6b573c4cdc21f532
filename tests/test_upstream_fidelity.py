"""Options that reproduce the released upstream code: the head's time embedding, upstream's parallel-decoding
layout and step split, REPA in the flow head, prompt truncation."""

from __future__ import annotations

import warnings

import pytest
import torch

from test_generator import PROMPTS, randomize_head, tiny_generator
from vgt_core.config import GenerationConfig
from vgt_core.flow import FlowHead, flow_matching_loss, timestep_embedding
from vgt_plugins.queryar.model import step_sizes


def test_balanced_split_spreads_the_remainder_over_the_first_steps():
    assert step_sizes(16, 3, "balanced") == [4, 3, 3, 3, 3]  # upstream's scheduler
    assert step_sizes(16, 3, "fixed") == [3, 3, 3, 3, 3, 1]
    assert step_sizes(16, 4, "balanced") == step_sizes(16, 4, "fixed") == [4, 4, 4, 4]
    assert step_sizes(16, 20, "balanced") == [16]


def test_time_scale_is_the_scale_of_t_in_the_embedding_and_changes_the_head():
    t = torch.rand(5)
    torch.testing.assert_close(timestep_embedding(t, scale=1000.0), timestep_embedding(t * 1000, scale=1.0))
    torch.manual_seed(0)
    upstream = FlowHead(4, 8, 16, 2, time_scale=1.0)
    for p in upstream.parameters():
        torch.nn.init.normal_(p, std=0.3)
    dit = FlowHead(4, 8, 16, 2, time_scale=1000.0)
    dit.load_state_dict(upstream.state_dict())  # same weights, another function of t
    x, c = torch.randn(5, 4), torch.randn(5, 8)
    assert (upstream(x, t, c) - dit(x, t, c)).abs().max() > 1e-2


@pytest.mark.parametrize("m,sizes", [(2, [2] * 8), (3, [4, 3, 3, 3, 3])])
def test_upstream_layout_feeds_the_last_queries_interleaved_with_their_latents(m, sizes):
    gen = randomize_head(tiny_generator())
    fed = []
    original = gen.backbone.forward
    gen.backbone.forward = lambda embeds, mask, ids, cache=None: fed.append((embeds, ids)) or original(embeds, mask, ids, cache)
    config = GenerationConfig(
        tokens_per_step=m, parallel_layout="upstream", step_split="balanced", order="raster", guidance_scale=1.0,
        num_sampling_steps=2, seed=0,
    )
    latents = gen.generate(PROMPTS, (4, 4), config)
    tokens = latents.flatten(2).transpose(1, 2)  # (B, 16, C), raster order
    queries, positions = gen.sampler.queries(gen, (4, 4)), gen.positions((4, 4))
    assert len(fed) == len(sizes)
    text = gen.embed_prompts(PROMPTS).mask.sum(1, keepdim=True)
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    torch.testing.assert_close(fed[0][0][:, -sizes[0]:], queries[: sizes[0]].expand(2, -1, -1))
    slots = sizes[0]
    for k in range(1, len(sizes)):
        prev = range(starts[k - 1], starts[k])
        expected = []
        for i in prev:  # [Q_i, z_i] for every position of the last step, then the next queries
            expected += [queries[i].expand(2, 1, -1), (gen.latent_in(tokens[:, i : i + 1]) + positions[i])]
        expected.append(queries[starts[k] : starts[k] + sizes[k]].expand(2, -1, -1))
        embeds, ids = fed[k]
        torch.testing.assert_close(embeds, torch.cat(expected, dim=1), atol=1e-5, rtol=1e-5)
        # sequence positions keep counting every slot fed, the repeated queries included (as upstream)
        assert (ids == text + slots + torch.arange(embeds.shape[1])).all()
        slots += embeds.shape[1]


def test_vgt_layout_feeds_only_the_last_latents():
    gen = randomize_head(tiny_generator())
    fed = []
    original = gen.backbone.forward
    gen.backbone.forward = lambda embeds, mask, ids, cache=None: fed.append(embeds.shape[1]) or original(embeds, mask, ids, cache)
    gen.generate(PROMPTS, (4, 4), GenerationConfig(tokens_per_step=4, order="raster", guidance_scale=1.0, num_sampling_steps=2, seed=0))
    assert fed[1:] == [8, 8, 8]  # 4 latents + 4 queries


def test_repa_loss_trains_the_projector_and_the_blocks_before_it_only():
    torch.manual_seed(0)
    head = FlowHead(4, 8, 32, 4, repa_dim=6, repa_hidden=16)
    assert head.repa_depth == 2
    target, cond, feats = torch.randn(64, 4), torch.randn(64, 8), torch.randn(64, 6)
    flow, repa = flow_matching_loss(head, target, cond, repa_target=feats)
    repa.backward()
    assert head.repa_projector[0].weight.grad.abs().sum() > 0
    assert head.input_proj.weight.grad.abs().sum() > 0  # reaches the blocks below the tap
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in head.blocks[2:].parameters())
    assert head.final.weight.grad is None or head.final.weight.grad.abs().sum() == 0

    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, repa = flow_matching_loss(head, target, cond, repa_target=feats)
        first = first if first is not None else repa.item()
        opt.zero_grad()
        repa.backward()
        opt.step()
    assert repa.item() < first - 0.5, (first, repa.item())  # -cos falls from ~0 towards -1


def test_a_repa_target_without_a_projector_is_an_error():
    head = FlowHead(4, 8, 16, 2)
    with pytest.raises(ValueError, match="repa_dim"):
        flow_matching_loss(head, torch.randn(3, 4), torch.randn(3, 8), repa_target=torch.randn(3, 6))


def test_long_prompts_are_cut_with_a_warning():
    gen = tiny_generator()
    gen.options = gen.options.model_copy(update={"max_prompt_tokens": 10})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = gen.embed_prompts([PROMPTS[1]])
    assert any("max_prompt_tokens" in str(w.message) for w in caught)
    image_start = 1 if gen.backbone.image_start_id is not None else 0
    assert batch.mask.sum() == 10 + image_start
    gen.options = gen.options.model_copy(update={"max_prompt_tokens": None})
    assert gen.embed_prompts([PROMPTS[1]]).mask.sum() > 10 + image_start
