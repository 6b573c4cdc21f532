"""Registry reuse: presets extend presets (`base:`), blocks are reused (`use:`), across files and plugins; every
`./` path is relative to its own file; `registry=` in Python, `--registry`/`VGT_REGISTRY` on the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from vgt_core import hookimpl
from vgt_core.compose import build_autoencoder, resolve
from vgt_core.config import PresetBook, load_presets
from vgt_core.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden" / "registry_presets.json"


def resolved_builtin_presets() -> dict[str, dict]:
    book = PresetBook()
    book.add_file(REPO / "registry.yaml")
    return {name: book.raw(name) for name in book.names()}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_builtin_presets_resolve_to_what_they_were_before_blocks_and_bases():
    """registry.yaml now uses `base:` and `use:`; every preset must still resolve to the dict it was when it spelled
    everything out (tests/golden, written from the registry before the change). A deliberate change of a preset
    rewrites the file: `python tests/test_registry_reuse.py`."""
    assert resolved_builtin_presets() == json.loads(GOLDEN.read_text())


def test_a_base_chain_across_files_deep_merges(tmp_path):
    first = write(tmp_path / "a.yaml", {"presets": {"small": {
        "base": "tiny-internvl3",
        "generator": {"head_depth": 3},  # merges: head_width and max_grid stay
        "decoder": {"options": {"config": {"decoder_block_out_channels": [16, 16, 32, 32, 32]}}},  # a list replaces
    }}})
    second = write(tmp_path / "b.yaml", {"presets": {"smaller": {
        "base": "small",  # a preset of another file
        "train_ae": {"stage1": {"steps": 7}},
        "train_ar": {"ema_decay": None},  # null clears
    }}})
    book = load_presets([first, second])
    preset = book.preset("smaller")
    assert (preset.generator.head_depth, preset.generator.head_width, preset.generator.max_grid) == (3, 64, 8)
    assert preset.decoder.options["config"]["decoder_block_out_channels"] == [16, 16, 32, 32, 32]
    assert preset.decoder.options["config"]["latent_channels"] == 32  # the rest of the block is the base's
    assert (preset.train_ae.stage1.steps, preset.train_ae.stage1.batch_size, preset.train_ae.stage2.steps) == (7, 8, 100)
    assert preset.train_ar.ema_decay is None and preset.train_ar.steps == 200
    assert preset.description == book.preset("tiny-internvl3").description  # inherited unless overridden


def test_a_component_of_another_name_replaces_the_base_one(tmp_path):
    path = write(tmp_path / "r.yaml", {"presets": {"vit": {
        "base": "tiny-internvl3",
        "decoder": {"name": "vit", "options": {"latent_channels": 32, "width": 64, "depth": 2, "heads": 4}},
    }}})
    decoder = load_presets(path).preset("vit").decoder
    assert decoder.name == "vit" and "config" not in decoder.options  # DC-AE's config did not leak into the ViT's


def test_blocks_are_used_across_files_with_overrides(tmp_path):
    blocks = write(tmp_path / "blocks.yaml", {"blocks": {
        "narrow-dcae": {"use": "tiny-dcae", "options": {"config": {"decoder_block_out_channels": [8, 8, 16, 16, 32]}}},
        "tiny-recipe": {"steps": 11, "batch_size": 4},
    }})
    presets = write(tmp_path / "presets.yaml", {"presets": {"p": {
        "base": "tiny-qwen25vl",
        "decoder": {"use": "narrow-dcae", "options": {"resize": "nearest"}},  # a block of a block, of the built-in file
        "train_ar": {"use": "tiny-recipe", "lr": 0.01},
    }}})
    preset = load_presets([blocks, presets]).preset("p")
    config = preset.decoder.options["config"]
    assert preset.decoder.name == "dcae" and preset.decoder.options["resize"] == "nearest"
    assert config["decoder_block_out_channels"] == [8, 8, 16, 16, 32] and config["encoder_block_out_channels"] == [8, 16, 16, 32, 32]
    # `use:` replaces the base's train_ar: steps and batch from the block, lr from the preset, the rest defaults
    assert (preset.train_ar.steps, preset.train_ar.batch_size, preset.train_ar.lr, preset.train_ar.ema_decay) == (11, 4, 0.01, 0.9999)


def test_the_example_of_docs_plugins_md_is_valid(tmp_path):
    """The registry file of docs/plugins.md (#presets-and-registry-files), on tiny-internvl3 instead of the
    example plugin's tiny-llava."""
    doc = (REPO / "docs" / "plugins.md").read_text()
    example = doc.split("```yaml\n# mine.yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "mine.yaml"
    path.write_text(example.replace("tiny-llava", "tiny-internvl3"))
    book = load_presets(path)
    vit, local = book.preset("tiny-internvl3-vit"), book.preset("tiny-internvl3-local")
    assert (vit.decoder.name, vit.decoder.options["depth"], vit.decoder.options["width"]) == ("vit", 3, 64)
    assert local.backbone.options["tokenizer"] == str(tmp_path / "tokenizer")
    assert local.backbone.options["config"]["model_type"] == "internvl"  # merged into the base's backbone
    assert book.preset("tiny-internvl3-mar").generation.tokens_per_step == 4


def test_presets_of_plugins_extend_and_are_extended(tmp_path, register_plugin):
    class Presets:
        @hookimpl
        def vgt_register_presets(self, register):
            register("plugin-tiny", {"base": "tiny-internvl3", "decoder": {"use": "tiny-dcae", "options": {"resize": "bicubic"}}})

    register_plugin(Presets(), "presets-plugin")
    path = write(tmp_path / "mine.yaml", {"presets": {"mine": {"base": "plugin-tiny", "sampler": {"name": "mar"}}}})
    book = load_presets(path)
    assert book.source("plugin-tiny") == "plugin presets-plugin"
    preset = book.preset("mine")
    assert (preset.sampler.name, preset.decoder.options["resize"], preset.backbone.name) == ("mar", "bicubic", "internvl3-lm")


def test_unknown_bases_blocks_and_cycles_are_clear_errors(tmp_path):
    path = write(tmp_path / "bad.yaml", {
        "blocks": {"loop-a": {"use": "loop-b"}, "loop-b": {"use": "loop-a"}},
        "presets": {
            "typo": {"base": "tiny-internvl"},
            "a": {"base": "b"}, "b": {"base": "c"}, "c": {"base": "a"},
            "no-block": {"base": "tiny-internvl3", "decoder": {"use": "tiny-dca"}},
            "looping-block": {"base": "tiny-internvl3", "decoder": {"use": "loop-a"}},
        },
    })
    book = load_presets(path)
    with pytest.raises(ConfigError, match=rf"{path}: presets.typo.base: unknown preset 'tiny-internvl'; known: tiny-internvl3, "):
        book.preset("typo")
    with pytest.raises(ConfigError, match=r"presets.c.base: presets extend each other in a cycle: a -> b -> c -> a"):
        book.preset("a")
    with pytest.raises(ConfigError, match=r"presets.no-block.decoder.use: unknown block 'tiny-dca'; known: tiny-dcae, "):
        book.preset("no-block")
    with pytest.raises(ConfigError, match=r"blocks use each other in a cycle: loop-a -> loop-b -> loop-a"):
        book.preset("looping-block")


def test_relative_paths_are_resolved_against_the_file_they_are_written_in(tmp_path):
    lib = write(tmp_path / "lib" / "lib.yaml", {
        "blocks": {"local-lm": {"name": "internvl3-lm", "options": {"tokenizer": "./tokenizer", "pretrained": "../weights"}}},
        "presets": {"base-p": {"base": "tiny-internvl3", "dataset": {"name": "shapes"}, "encoder": {"options": {"pretrained": "./vlm"}}}},
    })
    mine = write(tmp_path / "runs" / "mine.yaml", {
        "presets": {"p": {"base": "base-p", "backbone": {"use": "local-lm", "options": {"revision": "./not-a-path-key-but-a-path"}}}},
        "matrices": {"m": {"base": "p", "cells": {"c": {"encoder.options.pretrained": "./other-vlm"}}}},
    })
    book = load_presets([lib, mine])
    raw = book.raw("p")
    assert raw["backbone"]["options"]["tokenizer"] == str(tmp_path / "lib" / "tokenizer")  # the block's file
    assert raw["backbone"]["options"]["pretrained"] == str(tmp_path / "weights")
    assert raw["backbone"]["options"]["revision"] == str(tmp_path / "runs" / "not-a-path-key-but-a-path")  # the preset's file
    assert raw["encoder"]["options"]["pretrained"] == str(tmp_path / "lib" / "vlm")  # the base's file
    assert raw["encoder"]["options"]["config"]["model_type"] == "internvl"  # a hub-style value is left alone
    assert book.matrix("m").cells["c"]["encoder.options.pretrained"] == str(tmp_path / "runs" / "other-vlm")


def test_python_build_takes_a_registry(tmp_path):
    path = write(tmp_path / "mine.yaml", {"presets": {"tiny-mine": {
        "base": "tiny-internvl3", "encoder": {"options": {"image_size": 32}},
        "decoder": {"options": {"latent_channels": 16, "config": {"latent_channels": 16}}},
    }}})
    with pytest.raises(ConfigError, match="unknown preset 'tiny-mine'"):
        resolve("tiny-mine")
    assert resolve("tiny-mine", registry=path).encoder.options["image_size"] == 32
    ae = build_autoencoder("tiny-mine", registry=[path])
    assert (ae.latent_channels, ae.image_size) == (16, 32)


def test_cli_shows_the_merged_preset_from_registry_flag_and_environment(tmp_path):
    first = write(tmp_path / "one.yaml", {"presets": {"one": {"base": "tiny-internvl3", "generator": {"head_depth": 5}}}})
    second = write(tmp_path / "two.yaml", {"presets": {"two": {"base": "one", "sampler": {"name": "mar"}}}})
    env = {**os.environ, "VGT_REGISTRY": str(first)}
    result = subprocess.run(
        [sys.executable, "-m", "vgt_core.cli", "presets", "show", "two", "--json", "--registry", str(second)],
        capture_output=True, text=True, env=env,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["generator"]["head_depth"], shown["generator"]["head_width"], shown["sampler"]["name"]) == (5, 64, "mar")
    assert shown["decoder"]["options"]["config"]["latent_channels"] == 32  # the tiny-dcae block, filled in
    assert shown["backbone"]["options"]["attn_implementation"] == "sdpa"  # validated: the options' defaults shown
    listing = subprocess.run([sys.executable, "-m", "vgt_core.cli", "presets", "--json"], capture_output=True, text=True, env=env)
    assert listing.returncode == 0, listing.stderr
    listed = json.loads(listing.stdout)
    blocks = {row["name"]: row["source"] for row in listed["blocks"]}
    assert Path(blocks["tiny-dcae"]).resolve() == (REPO / "registry.yaml").resolve()
    assert {"one", "tiny-internvl3"} <= {row["name"] for row in listed["presets"]}


if __name__ == "__main__":  # rewrite the golden file after a deliberate change of registry.yaml's presets
    GOLDEN.write_text(json.dumps(resolved_builtin_presets(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
