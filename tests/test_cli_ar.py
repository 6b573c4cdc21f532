"""The command-line path of VGT-AR: train-ae -> cache-latents -> train-ar -> generate, and an exact resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vgt_shapes.world import ShapesWorld

TRAIN = ["--set", "train_ar.batch_size=4", "--set", "train_ar.sample_every=1000", "--set", "train_ar.log_every=1", "--set", "train_ar.keep_checkpoints=5"]


def vgt(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "vgt_core.cli", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    if "--quiet" in args:
        assert "it/s]" not in done.stderr, done.stderr[-500:]  # no progress bar, the libraries' own included
    return done


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A JSONL of captioned shapes images (one unreadable), a VGT-AE, its latent cache, a `vgt train-ar` run."""
    root = tmp_path_factory.mktemp("cli-ar")
    world = ShapesWorld(image_size=64, seed=5)
    rows = []
    for i in range(12):
        sample = world.sample(i)
        sample.image.save(root / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": sample.caption})
    (root / "broken.png").write_bytes(b"not an image")
    rows.append({"image": "broken.png", "caption": "a photo of a broken file"})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    vgt("train-ae", "--preset", "tiny-internvl3", "--data", str(root / "data.jsonl"), "--stage", "1", "--steps", "2", "--out", str(root / "ae"), "--quiet")
    cached = vgt("cache-latents", "--autoencoder", str(root / "ae"), "--data", str(root / "data.jsonl"), "--out", str(root / "cache"), "--quiet")
    assert "cached 12 latents" in cached.stdout and "skipped unreadable: 1" in cached.stdout
    args = ["--preset", "tiny-internvl3", "--autoencoder", str(root / "ae"), "--data", str(root / "cache"), *TRAIN]
    vgt("train-ar", *args, "--steps", "6", "--set", "train_ar.checkpoint_every=3", "--out", str(root / "ar"), "--quiet")
    return root, args


def test_generate_writes_reproducible_pngs_from_a_train_ar_model(trained, tmp_path):
    root, _ = trained
    model = str(root / "ar")  # the run folder; its model/ inside is found
    one = ["generate", "--model", model, "--prompt", "a red circle", "--tokens-per-step", "16", "--seed", "0", "--quiet"]
    vgt(*one, "--out", str(tmp_path / "x.png"))
    vgt(*one, "--out", str(tmp_path / "again.png"))
    image = Image.open(tmp_path / "x.png")
    assert image.size == (64, 64) and image.mode == "RGB"
    assert (tmp_path / "x.png").read_bytes() == (tmp_path / "again.png").read_bytes()  # the seed is honoured

    vgt(*one, "--compile", "--out", str(tmp_path / "compiled.png"))  # inductor: the same image, to rounding
    same = torch.tensor(np.asarray(Image.open(tmp_path / "compiled.png"))).int() - torch.tensor(np.asarray(image)).int()
    assert same.abs().max() <= 1

    no_compiler = {**os.environ, "CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    failed = subprocess.run([sys.executable, "-m", "vgt_core.cli", *one, "--compile", "--out", str(tmp_path / "c.png")],
                            capture_output=True, text=True, timeout=600, env=no_compiler)  # fmt: skip
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert "torch.compile could not build its kernels here (InvalidCxxCompiler" in failed.stderr
    assert "run without --compile" in failed.stderr and not (tmp_path / "c.png").exists()

    vgt(*one[:-3], "--seed", "1", "--out", str(tmp_path / "other.png"), "--quiet")
    assert (tmp_path / "other.png").read_bytes() != (tmp_path / "x.png").read_bytes()

    many = vgt("generate", "--model", model, "--prompt", "a red circle", "--prompt", "two blue squares",
               "--tokens-per-step", "4", "--guidance-scale", "2", "--out", str(tmp_path / "many"), "--quiet")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [".vgt-output", "0000.png", "0001.png"]  # + vgt's record
    assert "0001.png\ttwo blue squares" in many.stdout
    first = (tmp_path / "many" / "0000.png").read_bytes()
    vgt("generate", "--model", model, "--prompt", "a red circle", "--tokens-per-step", "4", "--seed", "1", "--out", str(tmp_path / "many"), "--quiet")
    assert sorted(p.name for p in (tmp_path / "many").glob("*.png")) == ["0000.png"]  # its own earlier images: replaced
    assert (tmp_path / "many" / "0000.png").read_bytes() != first


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_train_ar_resumes_from_its_last_checkpoint_to_the_same_weights(trained, tmp_path, optimizer):
    """A run that died after its step-3 checkpoint, resumed, ends where the uninterrupted run ended (with Muon too:
    both optimizers' states and the schedule's reach into both come back)."""
    root, args = trained
    args = [*args, "--steps", "6", "--set", "train_ar.checkpoint_every=3", "--set", f"train_ar.optimizer={optimizer}"]
    full = root / "ar"
    if optimizer != "adamw":
        full = tmp_path / "full"
        vgt("train-ar", *args, "--out", str(full), "--quiet")
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(full / "checkpoints" / "step-00000003", killed / "checkpoints" / "step-00000003")
    for name in ("preset.json", "log.jsonl"):
        if (full / name).exists():
            shutil.copy(full / name, killed / name)
    vgt("train-ar", *args, "--out", str(killed), "--resume", "--quiet")

    a = load_file(str(full / "model" / "generator" / "model.safetensors"))
    b = load_file(str(killed / "model" / "generator" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if optimizer != "adamw":
        adamw = load_file(str(root / "ar" / "model" / "generator" / "model.safetensors"))
        assert not torch.equal(adamw["head.blocks.0.mlp.0.weight"], a["head.blocks.0.mlp.0.weight"])
