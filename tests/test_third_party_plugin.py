"""The worked example of docs/plugins.md: a third-party package adds a VLM through the `vgt` entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, install_example, run_example_contract_tests

EXAMPLE = REPO / "docs" / "plugins" / "vgt-llava"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_example(EXAMPLE, tmp_path_factory.mktemp("site"))


def test_installed_plugin_shows_up_in_vgt_plugins(installed):
    result = subprocess.run([sys.executable, "-m", "vgt_core.cli", "plugins", "--json"], capture_output=True, text=True, env=installed)
    assert result.returncode == 0, result.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    assert rows[("encoder", "llava")]["package"] == "vgt-llava"
    assert rows[("backbone", "llava-lm")]["version"] == "0.1.0"
    assert rows[("encoder", "internvl3")]["package"] == "vgt"  # the built-ins are still there


def test_installed_plugin_builds_a_vgt_ae_with_the_dcae_decoder_and_a_generator(installed, tmp_path):
    script = f"""
import torch
from vgt_core.config import load_presets
from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.compose import build_generator
preset = load_presets().preset("tiny-llava")
ae = VGTAutoencoder.from_specs(preset.encoder.model_dump(), preset.decoder.model_dump())
x = torch.rand(2, 3, 64, 64) * 2 - 1
z = ae.encode(x)
assert ae.decode(z).shape == x.shape
ae.save_pretrained(r"{tmp_path}/ae")
again = VGTAutoencoder.from_pretrained(r"{tmp_path}/ae")
gen = build_generator(preset, again)
print(type(ae.encoder).__module__, ae.decoder.__class__.__name__, tuple(z.shape), float(gen(z.detach(), ["a", "b"])) > 0)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=installed)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["vgt_llava", "DCAEDecoder", "(2,", "32,", "4,", "4)", "True"]


def test_installed_plugin_passes_vgts_contract_tests(installed):
    """The example's own test file: its encoder and backbone subclass ``vgt_core.testing``'s contract classes."""
    run_example_contract_tests(EXAMPLE, "test_vgt_llava.py", installed)
