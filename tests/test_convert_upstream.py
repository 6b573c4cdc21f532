"""Upstream VGT checkpoints (hustvl/VGT) -> vgt folders: every tensor arrives, every other key is a named drop.

The upstream-shaped files are written here from the layout in reference/upstream.md §4 and §9: a tiny vgt model's
tensors are stored under upstream's names (q/k/v fused into InternViT's qkv, mmengine's ``module.`` prefixes and
``ema_state_dict``, Qwen2.5-VL's second copy of the LM, teacher copies, LM heads), so the converted model must hold
exactly the tensors that were put in.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import builtin_preset
from vgt_adapters.upstream import (
    DROPPED,
    LM_ALIAS_DROPPED,
    REPA_DROPPED,
    Conversion,
    UpstreamCheckpointError,
    convert_upstream,
    map_generator,
)
from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.cli import main
from vgt_core.compose import build
from vgt_core.config import load_presets
from vgt_core.pipeline import VGTPipeline

# InternVL3 with the parts the released InternViT has and the tiny preset lacks: q/k/v biases (fused into one
# qkv bias upstream) and qk-norm.
INTERNVL_OVERRIDES = {
    "encoder.options.config.vision_config.attention_bias": True,
    "encoder.options.config.vision_config.use_qk_norm": True,
}

# vgt name -> upstream name, written from the reference, independently of the converter's rules.
_V = r"^encoder\.tower\.vision_tower\."
UPSTREAM_INTERNVIT = [
    (_V + r"embeddings\.cls_token$", "encoder.embeddings.class_embedding"),
    (_V + r"embeddings\.position_embeddings$", "encoder.embeddings.position_embedding"),
    (_V + r"embeddings\.patch_embeddings\.projection\.", "encoder.embeddings.patch_embedding."),
    (_V + r"encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"encoder.encoder.layers.\1.attn.proj."),
    (_V + r"encoder\.layer\.(\d+)\.attention\.(q|k)_norm\.", r"encoder.encoder.layers.\1.attn.\2_norm."),
    (_V + r"encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.encoder.layers.\1.norm1."),
    (_V + r"encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.encoder.layers.\1.norm2."),
    (_V + r"encoder\.layer\.(\d+)\.lambda_(1|2)$", r"encoder.encoder.layers.\1.ls\2"),
    (_V + r"encoder\.layer\.(\d+)\.mlp\.", r"encoder.encoder.layers.\1.mlp."),
    (r"^encoder\.tower\.multi_modal_projector\.layer_norm\.", "mlp1.0."),
    (r"^encoder\.tower\.multi_modal_projector\.linear_1\.", "mlp1.1."),
    (r"^encoder\.tower\.multi_modal_projector\.linear_2\.", "mlp1.3."),
]
UPSTREAM_QWEN_VIT = [(r"^encoder\.tower\.", "encoder.")]
UPSTREAM_AE = [
    (r"^projection\.blocks\.", "down_blocks."),
    (r"^projection\.down\.", "down_mlp."),
    (r"^decoder\.decoder\.", "decoder."),
]
UPSTREAM_GENERATOR = [
    (r"^sampler\.query_grid$", "adaptive_metaquery.max_metaquery"),
    (r"^position_grid$", "adaptive_metaquery.pos_encoding.grid_embed"),
    (r"^latent_in\.", "image_in_projector."),
    (r"^latent_out\.", "image_out_projector."),
    (r"^head\.time_embed\.(0|2)\.", r"image_head.net.time_embed.mlp.\1."),
    (r"^head\.blocks\.(\d+)\.norm\.", r"image_head.net.res_blocks.\1.in_ln."),
    (r"^head\.blocks\.(\d+)\.mlp\.", r"image_head.net.res_blocks.\1.mlp."),
    (r"^head\.blocks\.(\d+)\.modulation\.1\.", r"image_head.net.res_blocks.\1.adaLN_modulation.1."),
    (r"^head\.final_modulation\.1\.", "image_head.net.final_layer.adaLN_modulation.1."),
    (r"^head\.final\.", "image_head.net.final_layer.linear."),
    (r"^head\.", "image_head.net."),  # input_proj, cond_embed
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key, count=1)
    raise AssertionError(f"the test's layout has no upstream name for {key}")


def upstream_ae(ae: VGTAutoencoder, family: str, teacher: bool = True) -> dict[str, torch.Tensor]:
    """``ae``'s tensors as upstream's VGT-AE state dict (InternViT q/k/v fused, teacher copies added)."""
    state = {k: v.clone() for k, v in ae.state_dict().items()}
    vit = UPSTREAM_INTERNVIT if family == "internvl3" else UPSTREAM_QWEN_VIT
    out: dict[str, torch.Tensor] = {}
    fused = re.compile(_V + r"encoder\.layer\.(\d+)\.attention\.q_proj\.(weight|bias)$")
    for key in list(state):
        m = fused.match(key)
        if m:
            parts = [state.pop(key.replace(".q_proj.", f".{n}_proj.")) for n in "qkv"]
            out[f"encoder.encoder.layers.{m.group(1)}.attn.qkv.{m.group(2)}"] = torch.cat(parts)
    for key, value in state.items():
        out[_rename(key, vit if key.startswith("encoder.") else UPSTREAM_AE)] = value
    if teacher:
        for key in [k for k in out if k.startswith(("encoder.", "mlp1."))]:
            name = "teacher." + key[len("encoder.") :] if key.startswith("encoder.") else "teacher_" + key
            out[name] = out[key] + 1  # a frozen copy; its values must not reach the model
    return out


def upstream_ar(gen, ae: VGTAutoencoder, family: str) -> dict[str, torch.Tensor]:
    """``gen``'s (and ``ae``'s) tensors as upstream's VGT_InternVL3 / VGT_Qwen25VL state dict."""
    out = {}
    for key, value in gen.state_dict().items():
        value = value.clone()
        if key.startswith("backbone.lm."):
            rest = key[len("backbone.lm.") :]
            if family == "internvl3":
                out["lmm.language_model.model." + rest] = value
            else:
                out["lmm.model.language_model." + rest] = value
                out["lmm.language_model." + rest] = value.clone()  # the alias upstream's pruning registers
        else:
            out[_rename(key, UPSTREAM_GENERATOR)] = value
    head = "lmm.language_model.lm_head.weight" if family == "internvl3" else "lmm.lm_head.weight"
    out[head] = torch.randn_like(gen.backbone.lm.embed_tokens.weight)
    width, hidden = gen.head.input_proj.out_features, 16
    for i, shape in ((0, (hidden, width)), (2, (hidden, hidden)), (4, (8, hidden))):  # REPA projector (pretraining)
        out[f"image_head.net.repa_projector.{i}.weight"] = torch.randn(shape)
        out[f"image_head.net.repa_projector.{i}.bias"] = torch.randn(shape[0])
    out["dinov3_extractor.model.cls_token"] = torch.randn(1, 1, 8)
    out.update({"vgt_ae." + k: v for k, v in upstream_ae(ae, family).items()})
    return out


def mmengine(ema: dict, noisy: dict) -> dict:
    """An mmengine checkpoint: ``state_dict`` (the live weights) beside ``ema_state_dict`` (DDP-prefixed + steps)."""
    return {
        "meta": {"epoch": 0, "iter": 5000},
        "state_dict": {"module." + k: v + 1 for k, v in noisy.items()},
        "ema_state_dict": {"steps": torch.tensor(5000), **{"module." + k: v for k, v in ema.items()}},
    }


def source_models(preset: str, overrides=None, seed: int = 0):
    torch.manual_seed(seed)
    p = load_presets().preset(preset, overrides)
    ae, gen = build(p)
    ae.set_latent_regularization("layernorm", p.train_ae.stage2.noise_sigma)  # as upstream's released AEs
    return ae, gen


def assert_same_tensors(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = model.state_dict(), expected.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def _saved(tmp_path: Path, state: dict) -> Path:
    path = tmp_path / "ar.pth"
    torch.save(state, path)
    return path


# -----------------------------------------------------------------------------------------------------------------


def test_internvl3_ar_file_converts_to_exactly_its_tensors_with_ema_winning(tmp_path):
    ae, gen = source_models("tiny-internvl3", INTERNVL_OVERRIDES)
    ar = upstream_ar(gen, ae, "internvl3")
    assert any(".attn.qkv.bias" in k for k in ar) and any(".attn.q_norm." in k for k in ar)
    torch.save(mmengine(ar, ar), tmp_path / "iter_5000.pth")
    other_ae = {k: v + 2 for k, v in upstream_ae(ae, "internvl3").items()}  # --ae differs: the AR file's copy wins
    save_file(other_ae, str(tmp_path / "vgt_ae.safetensors"))

    report = convert_upstream(
        "tiny-internvl3", tmp_path / "out", ae=tmp_path / "vgt_ae.safetensors", ar=tmp_path / "iter_5000.pth",
        overrides=INTERNVL_OVERRIDES,
    )

    pipe = VGTPipeline.from_pretrained(tmp_path / "out")
    assert_same_tensors(pipe.autoencoder, ae)
    assert_same_tensors(pipe.generator, gen)
    assert pipe.autoencoder.latent_norm.kind == "layernorm" and pipe.generator.latent_norm == "layernorm"
    assert report["ar_entry"] == "ema_state_dict" and report["kind"] == "pipeline"
    assert report["ae_overridden_by_ar"] == report["ae_differing_from_ar"] == len(ae.state_dict())
    dropped = report["dropped"]
    assert dropped[DROPPED[r"^(vgt_ae\.)?teacher(_mlp1)?\."]] == sum(k.startswith(("teacher", "vgt_ae.teacher")) for k in {**ar, **other_ae})
    assert dropped[DROPPED[r"^lmm\.(.+\.)?lm_head\."]] == 1
    assert dropped[DROPPED[r"^steps$"]] == 1 and dropped[DROPPED[r"^dinov3_extractor\."]] == 1
    assert dropped[REPA_DROPPED] == 6


def test_cli_converts_qwen25vl_files_into_a_pipeline_that_generates(tmp_path, capsys):
    ae, gen = source_models("tiny-qwen25vl")
    ar = upstream_ar(gen, ae, "qwen25vl")
    assert any(k.startswith("lmm.model.language_model.") for k in ar) and any(k.startswith("lmm.language_model.") for k in ar)
    save_file({"module." + k: v.contiguous() for k, v in ar.items()}, str(tmp_path / "ar.safetensors"))

    code = main(["convert-upstream", "--preset", "tiny-qwen25vl", "--ar", str(tmp_path / "ar.safetensors"),
                 "--out", str(tmp_path / "model"), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "VGT pipeline" in printed and LM_ALIAS_DROPPED in printed

    pipe = VGTPipeline.from_pretrained(tmp_path / "model")
    assert_same_tensors(pipe.autoencoder, ae)
    assert_same_tensors(pipe.generator, gen)
    images = pipe(["a red circle"], num_sampling_steps=2, seed=0, progress=False, output_type="pt")
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_ae_file_alone_gives_a_vgt_ae_folder(tmp_path):
    ae, _ = source_models("tiny-internvl3", INTERNVL_OVERRIDES, seed=1)
    torch.save({"state_dict": {"module." + k: v for k, v in upstream_ae(ae, "internvl3").items()}}, tmp_path / "ae.pth")
    code = main(["convert-upstream", "--preset", "tiny-internvl3", "--ae", str(tmp_path / "ae.pth"), "--out",
                 str(tmp_path / "ae"), "--quiet", *[f"--set={k}=true" for k in INTERNVL_OVERRIDES]])
    assert code == 0
    loaded = VGTAutoencoder.from_pretrained(tmp_path / "ae")
    assert_same_tensors(loaded, ae)
    with torch.no_grad():
        images = torch.rand(1, 3, 64, 64) * 2 - 1
        torch.testing.assert_close(loaded.encode(images), ae.eval().encode(images))


def test_unknown_and_missing_keys_are_errors_that_name_them(tmp_path):
    ae, gen = source_models("tiny-internvl3")
    ar = upstream_ar(gen, ae, "internvl3")
    extra = dict(ar, **{"image_head.net.mystery.weight": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(UpstreamCheckpointError, match=r"does not know.*image_head\.net\.mystery\.weight"):
        convert_upstream("tiny-internvl3", tmp_path / "a", ar=tmp_path / "extra.pth")

    missing = {k: v for k, v in ar.items() if k != "image_out_projector.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UpstreamCheckpointError, match=r"no upstream tensor fills: latent_out\.bias"):
        convert_upstream("tiny-internvl3", tmp_path / "b", ar=tmp_path / "missing.pth")

    no_ae = {k: v for k, v in ar.items() if not k.startswith("vgt_ae.")}
    torch.save(no_ae, tmp_path / "no_ae.pth")
    with pytest.raises(UpstreamCheckpointError, match="no VGT-AE weights"):
        convert_upstream("tiny-internvl3", tmp_path / "c", ar=tmp_path / "no_ae.pth")

    deeper = builtin_preset("tiny-internvl3")
    deeper["generator"] = {**deeper["generator"], "head_depth": 3}
    with pytest.raises(UpstreamCheckpointError, match=r"(?s)no upstream tensor fills: head\.blocks\.2\..*set generator\.head_depth=2"):
        convert_upstream(deeper, tmp_path / "d", ar=_saved(tmp_path, ar))
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_qwen_copies_of_the_lm_must_agree(tmp_path):
    ae, gen = source_models("tiny-qwen25vl")
    ar = upstream_ar(gen, ae, "qwen25vl")
    ar["lmm.language_model.norm.weight"] = ar["lmm.language_model.norm.weight"] + 1
    with pytest.raises(UpstreamCheckpointError, match=r"lmm\.language_model\.norm\.weight differs"):
        convert_upstream("tiny-qwen25vl", tmp_path / "out", ar=_saved(tmp_path, ar))


def _write_marker(path):  # what unpickling the planted object would do
    Path(path).write_text("code from the checkpoint ran")


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _write_marker, (str(self.marker),)


def test_a_file_that_needs_code_to_unpickle_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"down_mlp.1.weight": torch.zeros(2)}, "message_hub": Planted(marker)}, tmp_path / "ckpt.pth")
    code = main(["convert-upstream", "--preset", "tiny-internvl3", "--ae", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "refused: the file holds Python objects other than tensors" in err and "it needs test_convert_upstream._write_marker" in err
    assert "weights_only=False" in err and "save_file" in err  # how a user who trusts it re-saves it
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_repa_projector_maps_when_the_head_has_one_and_is_dropped_otherwise():
    state = {f"image_head.net.repa_projector.{i}.weight": torch.full((2, 2), float(i)) for i in (0, 2, 4)}
    with_repa = {f"head.repa_projector.{i}.weight" for i in (0, 2, 4)}
    conversion, problems, unknown = Conversion(), [], []
    mapped = map_generator(state, with_repa, conversion, problems, unknown)
    assert set(mapped.tensors) == with_repa and torch.equal(mapped.tensors["head.repa_projector.4.weight"], state["image_head.net.repa_projector.4.weight"])
    assert not conversion.dropped and not problems and not unknown

    conversion = Conversion()
    mapped = map_generator(state, {"head.final.weight"}, conversion, problems, unknown)
    assert not mapped.tensors and sorted(conversion.dropped[REPA_DROPPED]) == sorted(state)


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


def test_the_upstream_presets_carry_upstreams_prompt_shift_and_layers():
    book = load_presets()
    template = "<|im_start|>user\nGenerate an image: {caption}<|im_end|>\n<|im_start|>assistant\n"
    uncond = "<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n"
    internvl, qwen = book.preset("vgt-internvl3-1.6b"), book.preset("vgt-qwen25vl-2b")
    assert (internvl.generator.prompt_template, internvl.generator.uncond_prompt) == (template, uncond)
    assert (qwen.generator.prompt_template, qwen.generator.uncond_prompt) == (template + "<img>", uncond + "<img>")
    assert internvl.generator.time_shift == 1.4 and qwen.generator.time_shift == 1.0
    assert internvl.encoder.options["pretrained"] == "OpenGVLab/InternVL3-1B-hf"  # the AE is always InternVL3-1B's
    assert internvl.backbone.options["pretrained"] == "OpenGVLab/InternVL3-2B-hf"
    assert qwen.backbone.options["config"] == {"text_config": {"num_hidden_layers": 18}}
    for preset in (internvl, qwen):
        assert preset.backbone.options["use_chat_template"] is False  # no system prompt
        g = preset.generator
        assert (g.head_depth, g.head_width, g.max_grid) == (12, 1536, 64)
        s = preset.generation
        assert (s.guidance_scale, s.guidance_schedule, s.solver, s.num_sampling_steps) == (4.5, "decreasing", "sde", 30)
