"""registry.yaml: presets validate in two stages; every error names file, key path, value and choices."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO, builtin_preset
from vgt_core.config import PresetBook, apply_overrides, load_presets
from vgt_core.errors import ConfigError


def book_with(tmp_path, presets=None, matrices=None) -> tuple[PresetBook, str]:
    path = tmp_path / "my-registry.yaml"
    path.write_text(yaml.safe_dump({"presets": presets or {}, "matrices": matrices or {}}))
    book = PresetBook()
    book.add_file(path)
    return book, str(path)


def test_builtin_registry_is_valid():
    book = load_presets()
    book.check_all()
    assert {"tiny-internvl3", "tiny-qwen25vl", "internvl3-1b", "qwen25vl-3b"} <= set(book.names())


def test_unknown_key_names_file_path_and_allowed_keys(tmp_path):
    preset = builtin_preset("tiny-internvl3")
    preset["train_ae"]["stage1"]["learning_rate"] = 1e-3
    book, path = book_with(tmp_path, {"p": preset})
    with pytest.raises(ConfigError) as err:
        book.preset("p")
    message = str(err.value)
    assert path in message
    assert "presets.p.train_ae.stage1.learning_rate: unknown key 'learning_rate'" in message
    assert "allowed keys: steps, batch_size, lr," in message


def test_wrong_type_and_bad_choice_name_value_and_choices(tmp_path):
    preset = builtin_preset("tiny-internvl3")
    preset["train_ae"]["stage2"]["latent_norm"] = "layer-norm"
    preset["train_ae"]["stage1"]["steps"] = "many"
    book, _ = book_with(tmp_path, {"p": preset})
    with pytest.raises(ConfigError) as err:
        book.preset("p")
    message = str(err.value)
    assert "train_ae.stage2.latent_norm: got 'layer-norm'; allowed: 'none', 'layernorm' or 'batchnorm'" in message
    assert "train_ae.stage1.steps:" in message and "'many'" in message


def test_unknown_plugin_lists_known_ones_with_close_matches_first(tmp_path):
    preset = builtin_preset("tiny-internvl3")
    preset["decoder"]["name"] = "dc-ae"
    book, path = book_with(tmp_path, {"p": preset})
    with pytest.raises(ConfigError) as err:
        book.preset("p")
    assert f"{path}: presets.p.decoder.name: unknown decoder 'dc-ae'; known: dcae, " in str(err.value)


def test_component_options_are_validated_by_the_component(tmp_path):
    preset = builtin_preset("tiny-internvl3")
    preset["sampler"]["options"] = {"train_group_size": [4]}
    book, _ = book_with(tmp_path, {"p": preset})
    with pytest.raises(ConfigError, match=r"presets.p.sampler.options.train_group_size: unknown key .*allowed keys: train_group_sizes"):
        book.preset("p")


def test_matrix_cells_are_checked_and_unknown_base_reported(tmp_path):
    preset = builtin_preset("tiny-internvl3")
    good = {"base": "p", "axes": {"decoder.name": ["dcae", "vit"]}}
    book, _ = book_with(tmp_path, {"p": preset}, {"m": good, "bad": {"base": "nope"}})
    assert list(book.matrix("m").expand()) == ["name=dcae", "name=vit"]
    with pytest.raises(ConfigError, match="matrices.bad.base: unknown preset 'nope'"):
        book.check_all()


def test_unreadable_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("presets: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: cannot read"):
        PresetBook().add_file(path)


def test_overrides_set_dotted_keys_without_touching_the_original():
    base = {"a": {"b": 1}}
    assert apply_overrides(base, {"a.b": 2, "a.c.d": 3}) == {"a": {"b": 2, "c": {"d": 3}}}
    assert base == {"a": {"b": 1}}


def test_cli_reports_a_bad_registry_without_a_traceback(tmp_path):
    import subprocess
    import sys

    preset = builtin_preset("tiny-internvl3")
    preset["encoder"]["name"] = "internvl"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"presets": {"p": preset}}))
    result = subprocess.run(
        [sys.executable, "-m", "vgt_core.cli", "presets", "show", "p", "--registry", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown encoder 'internvl'; known: internvl3" in result.stderr
    assert "Traceback" not in result.stderr
    assert str(REPO) not in result.stderr or "r.yaml" in result.stderr


def test_an_override_through_a_yaml_anchor_changes_only_the_place_it_names():
    """tiny-internvl3's encoder and backbone share their VLM config through an anchor (&tiny_internvl3)."""
    from vgt_core.config import apply_overrides, load_presets

    book = load_presets()
    raw = book.raw("tiny-internvl3")
    key = "backbone.options.config.text_config.num_hidden_layers"
    changed = apply_overrides(raw, {key: 1})
    assert changed["backbone"]["options"]["config"]["text_config"]["num_hidden_layers"] == 1
    assert changed["encoder"]["options"]["config"]["text_config"]["num_hidden_layers"] == 2  # untouched
    again = book.raw("tiny-internvl3")
    again["encoder"]["options"]["config"]["downsample_ratio"] = 0.25
    assert again["backbone"]["options"]["config"]["downsample_ratio"] == 0.5
