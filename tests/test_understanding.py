"""The understanding pre-training: a tiny InternVL3 learns to describe shapes images before VGT tunes it to
generate, and its scores say which words it has learned."""

from __future__ import annotations

from transformers import InternVLForConditionalGeneration

from vgt_core.config import load_presets
from vgt_shapes import ShapesOptions
from vgt_shapes.understanding import pretrain_understanding


def test_the_vlm_learns_to_name_the_colours_it_sees_and_is_saved(tmp_path):
    config = load_presets().preset("shapes-demo").encoder.options["config"]
    world = ShapesOptions(image_size=32, tasks=["colors"], min_object_frac=0.35, max_object_frac=0.4)
    result = pretrain_understanding(config, tmp_path / "vlm", world=world, steps=150, eval_images=64, progress=False)
    before, after = result["before"], result["after"]
    assert before["color_accuracy"] < 0.3  # six colours: an untrained model names them at chance or worse
    assert after["color_accuracy"] > 0.7
    assert after["token_accuracy"] > before["token_accuracy"]
    assert 0 <= after["shape_accuracy"] <= 1 and 0 <= after["exact_match"] <= 1
    assert InternVLForConditionalGeneration.from_pretrained(tmp_path / "vlm").config.vision_config.image_size == [32, 32]
