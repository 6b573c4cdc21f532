"""Config overrides on a pretrained model: deep-merged, and a layer count keeps the checkpoint's first layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import builtin_preset
from vgt_core.compose import build


# -- config overrides on a pretrained model: deep merge, layer trimming ---------------------------------------------


def _tiny_vlm_folder(tmp_path: Path, family: str, text_layers: int) -> tuple[Path, torch.nn.Module]:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vgt_adapters.tokenizers import byte_level_tokenizer

    preset, config_class, model_class = {
        "internvl3": ("tiny-internvl3", InternVLConfig, InternVLForConditionalGeneration),
        "qwen25vl": ("tiny-qwen25vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[family]
    config = builtin_preset(preset)["encoder"]["options"]["config"]
    config["text_config"]["num_hidden_layers"] = text_layers
    torch.manual_seed(0)
    model = model_class(config_class.from_dict(config))
    folder = tmp_path / family
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder, model


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_a_one_key_config_override_keeps_every_other_key_and_touches_no_other_component(tmp_path):
    import yaml

    from vgt_core.config import PresetBook

    folder, _ = _tiny_vlm_folder(tmp_path, "internvl3", text_layers=3)
    tiny = builtin_preset("tiny-internvl3")
    trimmed = {"name": "internvl3-lm", "options": {"pretrained": str(folder), "config": {"text_config": {"num_hidden_layers": 1}}}}
    registry = {"presets": {
        name: {"encoder": {"name": "internvl3", "options": {"pretrained": str(folder)}}, "decoder": tiny["decoder"],
               "backbone": trimmed, "sampler": {"name": "queryar"}, "generator": tiny["generator"]}
        for name in ("p", "q")
    }}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(registry))  # safe_dump writes the shared dicts as YAML anchors
    assert "&id" in path.read_text()
    book = PresetBook()
    book.add_file(path)
    before = book.raw("p"), book.raw("q")

    ae, gen = build(book.preset("p"))

    from transformers import AutoConfig

    base = _flat(AutoConfig.from_pretrained(folder).to_dict())
    got = _flat(gen.backbone.config.to_dict())
    changed = {k for k in base.keys() | got.keys() if base.get(k) != got.get(k)}
    assert changed == {"text_config.num_hidden_layers", "text_config.layer_types"}, changed
    assert got["text_config.layer_types"] == base["text_config.layer_types"][:1]
    assert len(gen.backbone.lm.layers) == 1 and gen.backbone.hidden_size == 64
    assert _flat(ae.encoder.config.to_dict()) == base  # the encoder read the same folder without the override
    assert (book.raw("p"), book.raw("q")) == before  # nothing shared through the anchors was merged into


def test_text_layers_trimmed_on_a_pretrained_lm_load_its_first_layers(tmp_path):
    from vgt_core.plugins import registry

    folder, model = _tiny_vlm_folder(tmp_path, "qwen25vl", text_layers=4)
    backbone = registry().build(
        "backbone", "qwen25vl-lm", {"pretrained": str(folder), "config": {"text_config": {"num_hidden_layers": 2}}}
    )
    assert len(backbone.lm.layers) == 2
    checkpoint = model.model.language_model.state_dict()
    kept = backbone.lm.state_dict()
    assert any(k.startswith("layers.1.") for k in kept) and not any(k.startswith("layers.2.") for k in kept)
    for key, value in kept.items():
        assert torch.equal(value, checkpoint[key]), key

    for layers, message in ((5, "has only 4 layers"), (0, "at least one layer must stay")):
        with pytest.raises(ValueError, match=message):
            registry().build(
                "backbone", "qwen25vl-lm", {"pretrained": str(folder), "config": {"text_config": {"num_hidden_layers": layers}}}
            )
