"""The transformers adapters' contract for a new family: an explicit tokenizer for random weights (keeping the
family's image-start token), and image features in any of the layouts transformers returns them."""

from __future__ import annotations

import pytest
import torch

from conftest import builtin_preset
from vgt_adapters.hf_vision import HFVisionEncoder
from vgt_core.plugins import registry


def _options(preset: str, **changes) -> dict:
    options = builtin_preset(preset)["backbone"]["options"]
    options.update(changes)
    return {k: v for k, v in options.items() if v is not None}


def test_a_random_weight_backbone_without_a_tokenizer_is_an_error_naming_the_choice():
    with pytest.raises(ValueError, match="set the backbone option `tokenizer`.*`byte-level`"):
        registry().build("backbone", "internvl3-lm", _options("tiny-internvl3", tokenizer=None))


def test_a_vocabulary_too_small_for_the_byte_level_tokenizer_says_how_large_it_must_be():
    options = _options("tiny-internvl3")
    options["config"]["text_config"]["vocab_size"] = 40
    with pytest.raises(ValueError, match="embeds only 40: raise text_config.vocab_size to at least 260"):
        registry().build("backbone", "internvl3-lm", options)


def test_byte_level_keeps_the_family_image_start_token_through_export(tmp_path):
    backbone = registry().build("backbone", "qwen25vl-lm", _options("tiny-qwen25vl"))
    start = backbone.tokenizer.convert_tokens_to_ids("<|vision_start|>")  # not one of the byte tokenizer's own
    assert start == 260 and backbone.image_start_id == start and backbone.token_ids("a cat")[-1] == start
    again = registry().build("backbone", "qwen25vl-lm", backbone.export(tmp_path) | {"pretrained": str(tmp_path), "tokenizer": str(tmp_path)})
    assert again.token_ids("a cat") == backbone.token_ids("a cat")


@pytest.mark.parametrize(
    "features",
    [
        torch.arange(24.0).reshape(2, 4, 3),  # (B, N, d)
        torch.arange(24.0).reshape(8, 3),  # (B * N, d), images one after another
        list(torch.arange(24.0).reshape(2, 4, 3)),  # per-image (N, d)
        tuple(torch.arange(24.0).reshape(2, 2, 2, 3)),  # per-image (images * N, d) as SmolVLM returns them
    ],
)
def test_image_features_in_any_layout_become_one_batch(features):
    assert torch.equal(HFVisionEncoder.batched_features(features, 2), torch.arange(24.0).reshape(2, 4, 3))


def test_features_of_the_wrong_number_of_images_are_an_error_not_a_reshape():
    with pytest.raises(ValueError, match="features of 1 images for a batch of 2"):
        HFVisionEncoder.batched_features([torch.zeros(4, 3)], 2)
    with pytest.raises(ValueError, match="7 feature rows do not split into 2 images"):
        HFVisionEncoder.batched_features(torch.zeros(7, 3), 2)


# -- flash attention: what transformers' flash path would compute differently, refused before it runs --------------


def _flash(preset: dict, sampler_options: dict | None = None):
    """A generator of ``preset`` whose LM dispatches to flash attention (without flash-attn installed: the check
    must refuse before any kernel is reached)."""
    from vgt_core.compose import build_autoencoder, build_generator
    from vgt_core.config import check_preset

    raw = builtin_preset(preset)
    raw["sampler"]["options"] = {**(raw["sampler"].get("options") or {}), **(sampler_options or {})}
    p = check_preset(raw, "test", preset)
    torch.manual_seed(0)
    gen = build_generator(p, build_autoencoder(p)).eval()
    gen.backbone.lm.config._attn_implementation = "flash_attention_2"
    return gen, p


def test_flash_attention_refuses_grid_position_ids_in_one_row_it_would_read_as_packed_sequences():
    from vgt_core.errors import ConfigError

    gen, p = _flash("tiny-internvl3", {"position_ids": "grid"})
    one_row = p.generation.model_copy(update={"guidance_scale": 1.0, "tokens_per_step": 1, "num_sampling_steps": 1, "seed": 0})
    with pytest.raises(ConfigError, match="position ids that do not count up by one.*position_ids to sequence"):
        gen.generate(["a red circle"], (2, 2), one_row)


def test_flash_attention_refuses_mars_4d_mask():
    from vgt_core.errors import ConfigError

    gen, p = _flash("tiny-internvl3-mar")
    with pytest.raises(ConfigError, match="4-D attention mask.*attn_implementation to sdpa"):
        gen(torch.randn(2, 32, 4, 4), ["a red circle", "a blue square"])


def test_flash_attention_inputs_it_computes_right_pass():
    from vgt_adapters.hf_language import check_flash_attention_inputs

    grid = torch.tensor([[0, 1, 2, 7, 3, 9]])
    ones = torch.ones(1, 6, dtype=torch.long)
    check_flash_attention_inputs(ones, torch.arange(6)[None] + 4)  # consecutive: one sequence
    check_flash_attention_inputs(ones.expand(2, -1), grid.expand(2, -1))  # two rows: never read as packed
    check_flash_attention_inputs(torch.tensor([[0, 1, 1, 1, 1, 1]]), grid)  # padding: flash unpads by the mask
    check_flash_attention_inputs(ones[:, :1], grid[:, :1])  # one token (a decoding step)
