"""The bench scripts and their shared helpers (bench/_common.py): the models they time can run what the scripts time.

bench/generate.py's default, a 256-token image on the tiny presets, failed from the day generation began to check
the language model's positions (a 16 x 16 QueryAR sequence needs 514, the tiny presets have 512) until
``tiny_generator`` gave the model the positions its grid needs. ``bench/train_step.py --preset shapes-demo`` failed at
once (the demo's backbone reads its tokenizer from the VLM the demo trains first) until the script gave it the
world's tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import preset, tiny_generator  # noqa: E402
from train_step import with_world_tokenizer  # noqa: E402


@pytest.mark.parametrize("name", ["tiny-internvl3", "tiny-internvl3-mar"])
def test_bench_generators_make_the_256_token_image_the_scripts_time(name):
    torch.manual_seed(0)
    gen, preset = tiny_generator(name, 16, "cpu")
    config = preset.generation.model_copy(update={"tokens_per_step": 16, "num_sampling_steps": 1, "seed": 0})
    assert gen.generate(["a photo of a red circle"], (16, 16), config).shape == (1, 32, 16, 16)


def test_train_step_bench_builds_the_demo_generator_from_its_config(tmp_path):
    from vgt_core.compose import build_autoencoder, build_generator

    demo = preset("shapes-demo")
    with pytest.raises(ValueError, match="no tokenizer"):
        build_generator(demo, build_autoencoder(demo))
    given = with_world_tokenizer(demo, tmp_path)
    gen = build_generator(given, build_autoencoder(given))
    ids = gen.backbone.tokenizer("a photo of a red circle")["input_ids"]
    assert gen.backbone.tokenizer.unk_token_id not in ids  # the world's words, not a stand-in vocabulary
    assert with_world_tokenizer(preset("tiny-internvl3"), tmp_path) == preset("tiny-internvl3")


def test_full_size_bench_builds_every_full_size_preset_offline():
    """bench/full_size.py builds each hub preset from typed-in configs on the meta device (it failed once the
    backbone stopped taking a missing tokenizer for the byte-level one)."""
    from full_size import build_counts, full_size_presets

    names = full_size_presets()
    assert "internvl3-1b" in names
    counts = build_counts("internvl3-1b", hub=False)
    assert 490e6 < counts["lm"] < 500e6  # Qwen2-0.5B-class LM of InternVL3-1B without its output head (493.8 M)


@pytest.mark.parametrize("family", ["internvl3", "qwen25vl"])
def test_loading_bench_configs_make_working_backbones(family):
    """bench/loading.py's scaled VLMs must run: its Qwen2.5-VL text config once had 64-wide heads under a rope section
    for 128-wide ones, and vgt's contract probe (a forward) refused the backbone it times."""
    import copy

    from loading import FAMILIES, PLUGINS

    from vgt_core.plugins import registry

    config = copy.deepcopy(FAMILIES[family])
    config["text_config"].update(num_hidden_layers=1, vocab_size=512)
    if family == "internvl3":
        config["text_config"]["max_position_embeddings"] = 512
    backbone = registry().build("backbone", PLUGINS[family][1], {"config": config, "tokenizer": "byte-level"})
    assert backbone.hidden_size == config["text_config"]["hidden_size"]


def test_generate_bench_runs_and_its_ratios_are_its_own_side_by_side_timings(tmp_path):
    """bench/generate.py end to end at a 4 x 4 grid (seconds): the JSON keys issue #15 names, each ratio the quotient
    of the medians the same run measured."""
    import json
    import subprocess

    out = tmp_path / "generate.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "generate.py"
    subprocess.run([sys.executable, str(script), "--grid", "4", "--batches", "1", "--repeats", "1", "--json", str(out)],
                   check=True, capture_output=True, text=True)
    data = json.loads(out.read_text())
    s = data["seconds"]
    assert data["tokens"] == 16 and all(v > 0 for v in s.values())
    assert data["speedup_16_vs_1"] == pytest.approx(s["queryar b1 m1 cache"] / s["queryar b1 m16 cache"], rel=0.05)  # the JSON rounds seconds to 0.1 ms
    assert data["kv_cache_speedup_16"] == pytest.approx(s["queryar b1 m1 no-cache"] / s["queryar b1 m1 cache"], rel=0.05)  # the JSON rounds seconds to 0.1 ms
