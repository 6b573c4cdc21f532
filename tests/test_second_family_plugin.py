"""The second worked example of docs/plugins.md: SmolVLM, whose LM sits at ``model.text_model`` and whose connector
pixel-shuffles, pip-installed as a third-party package and checked on real (saved tiny) weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, install_example, run_example_contract_tests

EXAMPLE = REPO / "docs" / "plugins" / "vgt-smolvlm"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_example(EXAMPLE, tmp_path_factory.mktemp("site"))


def test_installed_plugin_shows_up_with_its_preset(installed):
    result = subprocess.run([sys.executable, "-m", "vgt_core.cli", "plugins", "--json"], capture_output=True, text=True, env=installed)
    assert result.returncode == 0, result.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    assert rows[("encoder", "smolvlm")]["package"] == "vgt-smolvlm"
    assert rows[("backbone", "smolvlm-lm")]["version"] == "0.1.0"
    shown = subprocess.run([sys.executable, "-m", "vgt_core.cli", "presets", "show", "tiny-smolvlm"], capture_output=True, text=True, env=installed)
    assert shown.returncode == 0 and "smolvlm-lm" in shown.stdout, shown.stderr


# Runs in a subprocess that sees the installed package (through its entry point, as a user's vgt would).
ROUND_TRIP = r"""
import sys, torch
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.compose import build_generator
from vgt_core.config import load_presets
from vgt_core.plugins import registry
from vgt_smolvlm import TINY

folder, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
hf = SmolVLMForConditionalGeneration(SmolVLMConfig.from_dict(TINY)).eval()
hf.save_pretrained(folder)  # real weights, read back by the plugin through `pretrained`

encoder = registry().build("encoder", "smolvlm", {"pretrained": folder}).eval()
assert type(encoder).__module__ == "vgt_smolvlm"
assert encoder.tower.text_model is None and encoder.tower.vision_model is not None  # only the vision half is held
torch.manual_seed(1)
images = torch.rand(2, 3, 64, 64) * 2 - 1
pixels = ((images + 1) / 2 - 0.5) / 0.5  # SmolVLM's normalisation, the family default (the folder has no processor)
with torch.no_grad():
    got = encoder(images)
    want = torch.stack(hf.get_image_features(pixel_values=pixels[:, None]).pooler_output)  # transformers' own path
    grey = encoder(torch.zeros(2, 3, 64, 64))  # all zeros once normalised: get_image_features would drop it
assert got.shape == (2, 16, 64) and encoder.grid(64) == (4, 4) and encoder.feature_dim == 64
try:  # the connector's pixel shuffle needs a square grid: said when the grid is asked for, not at a reshape
    encoder.grid((64, 32))
    raise SystemExit("a non-square grid was accepted")
except ValueError as exc:
    assert "square" in str(exc)
assert torch.equal(got, want), (got - want).abs().max()
assert grey.shape == (2, 16, 64)

backbone = registry().build("backbone", "smolvlm-lm", {"pretrained": folder, "tokenizer": "byte-level"}).eval()
assert type(backbone.lm).__name__ == "LlamaModel"
torch.manual_seed(2)
embeds = torch.randn(2, 7, 64)
mask = torch.ones(2, 7, dtype=torch.long)
mask[1, :3] = 0  # left padding, as embed_prompts lays batches out
positions = (mask.cumsum(-1) - 1).clamp(min=0)
with torch.no_grad():
    hidden, _ = backbone(embeds, mask, positions)
    want = hf.model.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
assert torch.equal(hidden, want), (hidden - want).abs().max()
# the family's image-start token survives the byte-level tokenizer, and closes every prompt
start = backbone.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
assert backbone.image_start_id == start and backbone.token_ids("a red circle")[-1] == start

# a VGT-AE on the loaded tower with the preset's decoder, saved and reloaded offline, then both pairings
preset = load_presets().preset("tiny-smolvlm")
spec = {"name": "smolvlm", "options": {"pretrained": folder}}
ae = VGTAutoencoder.from_specs(spec, preset.decoder.model_dump()).eval()
ae.save_pretrained(out + "/ae")
again = VGTAutoencoder.from_pretrained(out + "/ae").eval()
with torch.no_grad():
    z = ae.encode(images)
    assert torch.equal(again.encode(images), z) and again.decode(z).shape == images.shape
assert (again.encoder.tower.text_model is None)
own = preset.model_copy(update={"backbone": preset.backbone.model_copy(update={"options": {"pretrained": folder, "tokenizer": "byte-level"}})})
other = load_presets().preset("tiny-internvl3")  # a mismatched pairing: SmolVLM's latents, InternVL3's LM
for p in (own, other):
    loss = build_generator(p, again)(z, ["a red circle", "two blue squares"])
    assert torch.isfinite(loss) and loss > 0
print("ok")
"""


def test_real_weights_round_trip_equals_transformers(installed, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP, str(tmp_path / "smolvlm"), str(tmp_path)], capture_output=True, text=True, env=installed
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ok"


def test_the_documented_train_command_runs_offline(installed, tmp_path):
    """docs/plugins.md §8's command, on a folder of images, with an empty torch hub cache: nothing to download."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(8):  # one batch of the preset's recipe
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    env = {**installed, "TORCH_HOME": str(tmp_path / "torch-home"), "HF_HUB_OFFLINE": "1"}
    command = ["train-ae", "--preset", "tiny-smolvlm", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "ae"), "--steps", "2", "--quiet"]
    result = subprocess.run([sys.executable, "-m", "vgt_core.cli", *command], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "VGT-AE stage 1 saved to" in result.stdout
    assert not (tmp_path / "torch-home").exists()  # no LPIPS trunk was fetched


def test_installed_plugin_passes_vgts_contract_tests(installed):
    """The example's own test file: its encoder and backbone subclass ``vgt_core.testing``'s contract classes."""
    run_example_contract_tests(EXAMPLE, "test_vgt_smolvlm.py", installed)
