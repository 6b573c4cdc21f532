"""Encoder plugins read what the VLM's own transformers model computes, from a saved folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
)

from conftest import builtin_preset
from vgt_core.plugins import registry


def tiny_internvl(image_size=64, patch=8) -> InternVLForConditionalGeneration:
    config = builtin_preset("tiny-internvl3")["encoder"]["options"]["config"]
    config["vision_config"].update(image_size=[image_size, image_size], patch_size=[patch, patch])
    torch.manual_seed(0)
    return InternVLForConditionalGeneration(InternVLConfig.from_dict(config)).eval()


def tiny_qwen(patch=8) -> Qwen2_5_VLForConditionalGeneration:
    config = builtin_preset("tiny-qwen25vl")["encoder"]["options"]["config"]
    config["vision_config"]["patch_size"] = patch
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(config)).eval()


def test_internvl3_features_equal_transformers(tmp_path, images):
    model = tiny_internvl()
    model.save_pretrained(tmp_path)
    encoder = registry().build("encoder", "internvl3", {"pretrained": str(tmp_path)}).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=((images + 1) / 2 - mean) / std).pooler_output
        got = encoder(images)
    assert got.shape == (2, 16, model.config.text_config.hidden_size)
    torch.testing.assert_close(got, expected)
    assert encoder.tower.language_model is None  # only the vision part stays in memory


def test_internvl3_refuses_a_grid_its_pixel_shuffle_cannot_make():
    """transformers' InternVL pixel shuffle assumes a square patch grid: grid() says so instead of promising one."""
    encoder = registry().build("encoder", "internvl3", builtin_preset("tiny-internvl3")["encoder"]["options"])
    assert encoder.grid(64) == (4, 4)
    for size in [(32, 48), 40]:
        with pytest.raises(ValueError, match="square image whose side is a multiple of 16"):
            encoder.grid(size)


def test_qwen25vl_features_equal_transformers_with_its_image_processor(tmp_path):
    model = tiny_qwen()
    model.save_pretrained(tmp_path)
    encoder = registry().build("encoder", "qwen25vl", {"pretrained": str(tmp_path), "image_size": 64}).eval()
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    processor = Qwen2VLImageProcessor(patch_size=8, merge_size=2, temporal_patch_size=2, do_resize=False)
    inputs = processor(images=pil, return_tensors="pt")
    images = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 127.5 - 1 for p in pil])
    patches, grid_thw = encoder.preprocess(images)
    torch.testing.assert_close(patches, inputs["pixel_values"], atol=1e-5, rtol=1e-5)
    assert grid_thw.tolist() == inputs["image_grid_thw"].tolist()
    with torch.no_grad():
        expected = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        got = encoder(images)
    assert got.shape == (2, 16, model.config.vision_config.out_hidden_size)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["internvl3", "qwen25vl"])
def test_448px_gives_a_16x16_grid_of_32_channel_latents(name):
    """The paper's geometry: 448 px, patch 14, 2x2 merge -> 16 x 16 latents of 32 channels."""
    from vgt_core.autoencoder import VGTAutoencoder

    preset = builtin_preset(f"tiny-{'internvl3' if name == 'internvl3' else 'qwen25vl'}")
    options = preset["encoder"]["options"]
    if name == "internvl3":
        options["config"]["vision_config"].update(image_size=[448, 448], patch_size=[14, 14])
    else:
        options["config"]["vision_config"].update(patch_size=14, window_size=112)
        options["image_size"] = 448
    ae = VGTAutoencoder.from_specs(preset["encoder"], preset["decoder"]).eval()
    x = torch.rand(1, 3, 448, 448) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        out = ae.decode(z)
    assert ae.grid == (16, 16)
    assert z.shape == (1, 32, 16, 16)
    assert out.shape == x.shape  # 28x: the decoder's output is resized to the input size
