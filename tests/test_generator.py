"""VGT-AR: QueryAR and MAR on a real (tiny) InternVL3 / Qwen2.5-VL language model."""

from __future__ import annotations

import pytest
import torch

from conftest import builtin_preset
from vgt_core.config import GenerationConfig
from vgt_core.generator import VGTGenerator, guidance_at
from vgt_plugins.mar.model import revealed_after
from vgt_plugins.queryar.model import step_sizes

PROMPTS = ["a red circle", "a photo of two blue squares left of a green triangle"]  # different lengths: padding


def tiny_generator(sampler="queryar", preset="tiny-internvl3", sampler_options=None, latent_norm="layernorm") -> VGTGenerator:
    p = builtin_preset(preset)
    torch.manual_seed(0)
    return VGTGenerator.from_specs(
        p["backbone"], {"name": sampler, "options": sampler_options or {}}, latent_norm=latent_norm, options=p["generator"]
    )


def randomize_head(gen: VGTGenerator) -> VGTGenerator:
    """A fresh head predicts 0 (zero-init output); give it weights so that the LM's state matters."""
    torch.manual_seed(1)
    for p in gen.head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return gen.eval()


@pytest.mark.parametrize("preset", ["tiny-internvl3", "tiny-qwen25vl"])
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("position_ids", ["sequence", "grid"])
def test_kv_cached_generation_equals_the_cache_free_reference(preset, m, position_ids):
    gen = randomize_head(tiny_generator(preset=preset, sampler_options={"position_ids": position_ids}))
    config = GenerationConfig(tokens_per_step=m, num_sampling_steps=4, guidance_scale=3.0, seed=7)
    cached = gen.generate(PROMPTS, (4, 4), config)
    reference = gen.generate(PROMPTS, (4, 4), config.model_copy(update={"use_cache": False}))
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cached, gen.generate(PROMPTS, (4, 4), config.model_copy(update={"seed": 8})))


@pytest.mark.parametrize("position_ids", ["sequence", "grid"])
def test_generation_reads_the_states_training_reads(position_ids):
    """Fed the latents it drew, in the order it drew them, training's forward pass computes the same LM state at
    every query as generation did: the two build the same sequence with the same positions (RoPE included)."""
    gen = randomize_head(tiny_generator(sampler_options={"position_ids": position_ids, "train_order": "raster"}))
    seen = []
    original = gen.sample_tokens
    gen.sample_tokens = lambda hidden, *a: seen.append(hidden) or original(hidden, *a)
    config = GenerationConfig(tokens_per_step=1, num_sampling_steps=2, guidance_scale=1.0, order="raster", seed=0)
    latents = gen.generate(PROMPTS, (4, 4), config)
    tokens = latents.flatten(2).transpose(1, 2)
    read, index, _ = gen.sampler.training_targets(gen, tokens, (4, 4), gen.embed_prompts(PROMPTS))
    torch.testing.assert_close(read, torch.cat(seen, dim=1), atol=1e-5, rtol=1e-5)
    assert (index == torch.arange(16)).all()  # raster order: the k-th state predicts latent k


def test_grid_position_ids_number_image_slots_by_their_place_in_the_grid():
    """Query and latent of grid position i both sit at RoPE position len(text) + i, in any order, for
    left-padded prompts of any length; the default numbers slots by their place in the sequence (upstream)."""
    ids = {}
    for mode in ("sequence", "grid"):
        gen = tiny_generator(sampler_options={"position_ids": mode})
        original = gen.backbone.forward
        gen.backbone.forward = lambda e, m, pos, *a: ids.__setitem__(mode, (pos, m)) or original(e, m, pos, *a)
        torch.manual_seed(3)
        gen(torch.randn(2, 32, 4, 4), PROMPTS)
    pos, mask = ids["grid"]
    text = mask[:, :-32].sum(1)
    image = pos[:, -32:] - text[:, None]
    for row in image:
        queries, latents = row[0::2], row[1::2]  # [Q, z] pairs in the drawn order
        assert torch.equal(queries, latents) and sorted(queries.tolist()) == list(range(16))
        assert not torch.equal(queries, torch.arange(16))  # a random order, not raster
    pos, _ = ids["sequence"]
    assert torch.equal(pos[:, -32:] - text[:, None], torch.arange(32).expand(2, 32))


def test_padding_does_not_leak_into_any_step():
    """A prompt generates the same latents alone or batched beside a longer prompt (it is left-padded then),
    at every step. Near-zero temperature makes the ODE deterministic, so the noise drawn for the other row
    cannot explain a difference: only the attention mask could."""
    gen = randomize_head(tiny_generator())
    for m in (1, 4):
        config = GenerationConfig(tokens_per_step=m, num_sampling_steps=3, guidance_scale=2.0, order="raster", temperature=1e-6)
        alone = gen.generate(PROMPTS[:1], (4, 4), config)
        batched = gen.generate(PROMPTS, (4, 4), config)
        torch.testing.assert_close(batched[:1], alone, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(batched[0], batched[1], atol=1e-2)  # the two prompts do differ


@pytest.mark.parametrize("m,passes", [(1, 16), (4, 4), (16, 1), ([1, 3, 12], 3)])
def test_m_tokens_per_step_takes_n_over_m_lm_passes(m, passes):
    gen = randomize_head(tiny_generator())
    calls = []
    original = gen.backbone.forward
    gen.backbone.forward = lambda *a, **k: calls.append(a[0].shape[1]) or original(*a, **k)
    gen.generate(PROMPTS, (4, 4), GenerationConfig(tokens_per_step=m, num_sampling_steps=2, seed=0))
    assert len(calls) == passes


def test_mar_uses_the_cosine_schedule_and_computes_the_prompt_once():
    gen = randomize_head(tiny_generator("mar"))
    calls = []
    original = gen.backbone.forward
    gen.backbone.forward = lambda *a, **k: calls.append(a[0].shape[1]) or original(*a, **k)
    gen.generate(PROMPTS, (4, 4), GenerationConfig(num_iter=4, num_sampling_steps=2, seed=0))
    assert len(calls) == 1 + 4 and calls[1:] == [16] * 4  # the prompt once, then the 16 image tokens per step
    steps, done = [], 0
    for step in range(4):
        upto = revealed_after(step, 4, 16, done)
        steps.append(upto - done)
        done = upto
    assert sum(steps) == 16 and min(steps) >= 1 and steps == sorted(steps)  # cosine: few first, more later


def test_guidance_schedules_name_their_direction():
    config = GenerationConfig(guidance_scale=4.0, guidance_schedule="increasing")
    assert guidance_at(config, 0, 1, 16) < guidance_at(config, 15, 1, 16) == 4.0
    config = config.model_copy(update={"guidance_schedule": "decreasing"})
    assert guidance_at(config, 0, 1, 16) == 4.0 > guidance_at(config, 15, 1, 16)
    assert guidance_at(config.model_copy(update={"guidance_schedule": "constant"}), 9, 1, 16) == 4.0


def test_guidance_scale_one_equals_the_conditional_branch_alone():
    gen = randomize_head(tiny_generator())
    base = GenerationConfig(tokens_per_step=4, num_sampling_steps=3, seed=3)
    alone = gen.generate(PROMPTS, (4, 4), base.model_copy(update={"guidance_scale": 1.0}))  # no uncond rows at all
    both = gen.generate(PROMPTS, (4, 4), base.model_copy(update={"guidance_scale": 1.0 + 1e-7}))  # both branches run
    torch.testing.assert_close(both, alone, atol=1e-4, rtol=1e-4)


def test_prompt_dropout_puts_the_unconditioned_prompt_in_the_row():
    gen = tiny_generator()
    batch = gen.embed_prompts(["a red circle", "a blue square"], uncond=torch.tensor([True, False]))
    uncond = gen.backbone.embed_prompts([gen.options.uncond_prompt])[0]
    length = uncond.shape[1]
    torch.testing.assert_close(batch.embeds[0, -length:], uncond[0])
    assert batch.mask[0].sum() == length


def test_sampled_latents_are_renormalised_like_the_autoencoders():
    gen = randomize_head(tiny_generator(latent_norm="layernorm"))
    z = gen.generate(PROMPTS, (4, 4), GenerationConfig(tokens_per_step=4, num_sampling_steps=2, seed=0))
    per_token = z.flatten(2).transpose(1, 2)
    torch.testing.assert_close(per_token.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)


def test_generator_saves_and_reloads(tmp_path):
    gen = randomize_head(tiny_generator("queryar", "tiny-qwen25vl", {"train_group_sizes": [1, 4]}))
    gen.save_pretrained(tmp_path / "g")
    loaded = VGTGenerator.from_pretrained(tmp_path / "g")
    config = GenerationConfig(tokens_per_step=4, num_sampling_steps=2, seed=0)
    torch.testing.assert_close(loaded.generate(PROMPTS, (4, 4), config), gen.generate(PROMPTS, (4, 4), config))
    assert loaded.sampler.options.train_group_sizes == [1, 4]


def test_prompt_ids_are_tokenised_once_and_stay_the_same(monkeypatch):
    backbone = tiny_generator().backbone
    expected = [backbone.token_ids(p) for p in PROMPTS]
    calls = []
    original = type(backbone).token_ids
    monkeypatch.setattr(type(backbone), "token_ids", lambda self, p, m=None: calls.append(p) or original(self, p, m))
    first = backbone.embed_prompts(PROMPTS * 3)
    second = backbone.embed_prompts(list(reversed(PROMPTS)))
    assert sorted(calls) == sorted(PROMPTS)  # each distinct prompt once, whatever the batch
    for row, ids in enumerate(expected):
        assert first[1][row].sum() == len(ids)
    torch.testing.assert_close(second[0][1, -len(expected[0]) :], first[0][0, -len(expected[0]) :])
    monkeypatch.setattr(type(backbone), "PROMPT_CACHE_SIZE", 1)
    backbone.embed_prompts(["a green triangle", "a blue square"])  # full: the cache starts again, bounded
    assert len(backbone._prompt_ids) == 1


@pytest.mark.parametrize("preset", ["tiny-internvl3", "tiny-qwen25vl"])
@pytest.mark.parametrize("sampler, m, layout", [("queryar", 1, "vgt"), ("queryar", 4, "vgt"), ("queryar", 4, "upstream"), ("mar", 4, "vgt")])
def test_the_static_kv_cache_generates_what_the_dynamic_one_does_writing_in_place(preset, sampler, m, layout):
    """generation.cache_implementation static: transformers' StaticCache, sized for the prompt and every slot the
    sampler feeds (a pass past its end would fail), gives the dynamic cache's latents, and its key tensor is the same
    storage at every pass, where the dynamic cache copies the prefix into a new one."""
    gen = randomize_head(tiny_generator(sampler, preset))
    keys: dict[str, list[torch.Tensor]] = {"dynamic": [], "static": []}  # held, so that no address is reused
    forward = type(gen.backbone).forward

    def watched(self, embeds, mask, ids, cache=None):
        hidden, cache = forward(self, embeds, mask, ids, cache)
        keys[kind].append(cache.layers[0].keys)
        return hidden, cache

    config = GenerationConfig(tokens_per_step=m, num_sampling_steps=2, guidance_scale=2.0, parallel_layout=layout, seed=5)
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(gen.backbone), "forward", watched)
        for kind in ("dynamic", "static"):
            out[kind] = gen.generate(PROMPTS, (4, 4), config.model_copy(update={"cache_implementation": kind}))
    torch.testing.assert_close(out["static"], out["dynamic"], atol=1e-5, rtol=1e-5)
    storages = {kind: {k.data_ptr() for k in held} for kind, held in keys.items()}
    assert len(storages["static"]) == 1 and len(keys["static"]) > 2
    if sampler == "queryar":
        assert len(storages["dynamic"]) == len(keys["dynamic"])  # a new, longer tensor every pass


def test_a_static_cache_needs_a_backbone_that_preallocates():
    gen = tiny_generator()
    plain = type(gen.backbone).new_cache
    gen.backbone.new_cache = lambda: plain(gen.backbone)  # a third party's new_cache(self), without max_length
    config = GenerationConfig(tokens_per_step=16, num_sampling_steps=1, cache_implementation="static", seed=0)
    with pytest.raises(ValueError, match="cache_implementation 'static'.*allowed for this backbone: 'dynamic'"):
        gen.generate(PROMPTS, (4, 4), config)
    assert gen.generate(PROMPTS, (4, 4), config.model_copy(update={"cache_implementation": "dynamic"})).shape == (2, 32, 4, 4)
