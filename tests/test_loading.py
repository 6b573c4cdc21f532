"""A VLM component loads only its part of the checkpoint, in the requested dtype, and exports only its half."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from test_encoders import tiny_internvl, tiny_qwen
from vgt_core.errors import ConfigError
from vgt_core.plugins import registry
from vgt_core.serialization import resolve_relative

FAMILIES = {
    # name: (tiny model, transformers class, encoder, backbone, encoder options, kept vision part, LM checkpoint keys)
    "internvl3": (tiny_internvl, InternVLForConditionalGeneration, "internvl3", "internvl3-lm", {}, "model", ("language_model.",)),
    "qwen25vl": (tiny_qwen, Qwen2_5_VLForConditionalGeneration, "qwen25vl", "qwen25vl-lm", {"image_size": 64}, "model.visual", ("model.", "lm_head.")),
}
VISION_KEYS = ("vision_tower.", "multi_modal_projector.", "visual.")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    """A tiny real VLM of each family saved with ``save_pretrained`` (the layout hub checkpoints have)."""
    make, cls, *_ = FAMILIES[request.param]
    from vgt_adapters.tokenizers import byte_level_tokenizer

    folder = tmp_path_factory.mktemp(request.param)
    make().save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return request.param, folder


@pytest.fixture
def reads(monkeypatch):
    """Every checkpoint tensor the adapters read, by name."""
    import vgt_adapters.hf_common as hf_common

    keys: list[str] = []

    class Recording:
        def __init__(self, path, framework):
            self.file = safe_open(path, framework=framework)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            keys.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(hf_common, "safe_open", Recording)
    return keys


def part(model, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_encoder_holds_exactly_the_vision_weights_and_never_reads_the_lm(saved, reads, dtype):
    family, folder = saved
    _, cls, encoder_name, _, extra, vision_path, lm_keys = FAMILIES[family]
    full = cls.from_pretrained(folder, dtype=getattr(torch, dtype))
    encoder = registry().build("encoder", encoder_name, {"pretrained": str(folder), "dtype": dtype, **extra})

    expected = part(full, vision_path).state_dict()
    expected = {k: v for k, v in expected.items() if not k.startswith("language_model.")}
    got = encoder.tower.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in got.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    assert {p.dtype for p in encoder.parameters()} == {getattr(torch, dtype)}
    for name, buffer in encoder.tower.named_buffers():  # rotary frequencies: computed as transformers does (float32)
        torch.testing.assert_close(buffer, part(full, vision_path).get_buffer(name), rtol=0, atol=0)

    assert reads and len(reads) == len(got)  # one read per tensor of the tower, nothing else
    assert not [k for k in reads if k.startswith(lm_keys) and not k.startswith(VISION_KEYS)]
    assert not any("TextModel" in type(m).__name__ or type(m).__name__ == "Qwen2Model" for m in encoder.modules())


def test_backbone_holds_exactly_the_lm_weights_and_never_reads_the_vision_tower(saved, reads):
    family, folder = saved
    _, cls, _, backbone_name, *_ = FAMILIES[family]
    full = cls.from_pretrained(folder, dtype=torch.bfloat16)
    backbone = registry().build("backbone", backbone_name, {"pretrained": str(folder), "dtype": "bfloat16"})
    expected = full.model.language_model.state_dict()
    got = backbone.lm.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in got.items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, expected[key]), key
    assert len(reads) == len(got) and not [k for k in reads if k.startswith(VISION_KEYS) or k.startswith("lm_head")]


def test_layer_override_keeps_the_first_layers_and_reads_no_other(saved, reads):
    family, folder = saved
    _, cls, _, backbone_name, *_ = FAMILIES[family]
    full = cls.from_pretrained(folder, dtype=torch.float32)
    options = {"pretrained": str(folder), "config": {"text_config": {"num_hidden_layers": 1}}}
    backbone = registry().build("backbone", backbone_name, options)
    assert len(backbone.lm.layers) == 1
    for key, value in backbone.lm.state_dict().items():
        assert torch.equal(value, full.model.language_model.state_dict()[key]), key
    assert not [k for k in reads if ".layers.1." in k]


def _rewrite(folder, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_missing_or_unexpected_tensor_is_an_error_naming_it(tmp_path):
    tiny_internvl().save_pretrained(tmp_path)
    lost = "vision_tower.encoder.layer.1.mlp.fc2.bias"
    _rewrite(tmp_path, lambda t: t.pop(lost))
    with pytest.raises(ValueError, match="encoder.layer.1.mlp.fc2.bias"):
        registry().build("encoder", "internvl3", {"pretrained": str(tmp_path)})

    tiny_internvl().save_pretrained(tmp_path)
    stray = "vision_tower.encoder.layer.0.mlp.fc3.weight"
    _rewrite(tmp_path, lambda t: t.update({stray: torch.zeros(2)}))
    with pytest.raises(ValueError, match=stray.replace(".", r"\.")):
        registry().build("encoder", "internvl3", {"pretrained": str(tmp_path)})
    # a stray tensor in the language model does not concern the encoder (it is never read)
    tiny_internvl().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"language_model.model.bogus.weight": torch.zeros(2)}))
    registry().build("encoder", "internvl3", {"pretrained": str(tmp_path)})


def test_exports_keep_only_their_half_and_reload_to_the_same_weights(saved, tmp_path):
    family, folder = saved
    _, _, encoder_name, backbone_name, extra, *_ = FAMILIES[family]
    reg = registry()
    encoder = reg.build("encoder", encoder_name, {"pretrained": str(folder), **extra})
    (tmp_path / "enc").mkdir()
    options = resolve_relative(encoder.export(tmp_path / "enc"), tmp_path / "enc")
    text = json.loads((tmp_path / "enc" / "config.json").read_text())["text_config"]
    assert set(text) <= {"model_type", "hidden_size"}  # no layers, vocabulary, heads... of the LM
    reloaded = reg.build("encoder", encoder_name, options)
    assert reloaded.feature_dim == encoder.feature_dim and reloaded.grid(64) == encoder.grid(64)
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {k: v.shape for k, v in encoder.state_dict().items()}

    backbone = reg.build("backbone", backbone_name, {"pretrained": str(folder)})
    (tmp_path / "lm").mkdir()
    options = resolve_relative(backbone.export(tmp_path / "lm"), tmp_path / "lm")
    vision = json.loads((tmp_path / "lm" / "config.json").read_text())["vision_config"]
    assert set(vision) <= {"model_type"}
    reloaded = reg.build("backbone", backbone_name, options)
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == {k: v.shape for k, v in backbone.state_dict().items()}


def test_architecture_only_parts_get_real_initialised_weights_in_dtype(images):
    from conftest import builtin_preset

    options = {**builtin_preset("tiny-internvl3")["encoder"]["options"], "dtype": "bfloat16"}
    encoder = registry().build("encoder", "internvl3", options)
    assert not any(p.is_meta for p in encoder.parameters())
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    norms = [m.weight for m in encoder.modules() if "LayerNorm" in type(m).__name__ and m.weight is not None]
    assert norms and all(torch.equal(w, torch.ones_like(w)) for w in norms)  # transformers' init ran
    with torch.no_grad():
        assert torch.isfinite(encoder(images).float()).all()


@pytest.mark.parametrize(
    ("kind", "name", "options", "allowed"),
    [
        ("encoder", "internvl3", {"dtype": "bf16"}, "'float32', 'bfloat16' or 'float16'"),
        ("decoder", "dcae", {"dtype": "half"}, "'float32', 'bfloat16' or 'float16'"),
        ("backbone", "internvl3-lm", {"attn_implementation": "flash"}, "'sdpa', 'eager' or 'flash_attention_2'"),
        ("backbone", "qwen25vl-lm", {"gradient_checkpointing": True}, "train_ar.gradient_checkpointing"),
    ],
)
def test_bad_precision_options_name_the_allowed_values(kind, name, options, allowed):
    with pytest.raises(ConfigError) as err:
        registry().get(kind, name).validate(options)
    assert allowed in str(err.value)


def test_older_folders_with_gradient_checkpointing_false_still_load():
    validated = registry().get("encoder", "internvl3").validate({"gradient_checkpointing": False, "config": {}})
    assert "gradient_checkpointing" not in validated.model_dump()
