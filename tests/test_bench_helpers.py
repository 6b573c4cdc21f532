"""The bench scripts' shared helpers (bench/_common.py): the models they time can run what the scripts time.

bench/generate.py's default, a 256-token image on the tiny presets, failed from the day generation began to check
the language model's positions (a 16 x 16 QueryAR sequence needs 514, the tiny presets have 512) until
``tiny_generator`` gave the model the positions its grid needs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import tiny_generator  # noqa: E402


@pytest.mark.parametrize("name", ["tiny-internvl3", "tiny-internvl3-mar"])
def test_bench_generators_make_the_256_token_image_the_scripts_time(name):
    torch.manual_seed(0)
    gen, preset = tiny_generator(name, 16, "cpu")
    config = preset.generation.model_copy(update={"tokens_per_step": 16, "num_sampling_steps": 1, "seed": 0})
    assert gen.generate(["a photo of a red circle"], (16, 16), config).shape == (1, 32, 16, 16)
