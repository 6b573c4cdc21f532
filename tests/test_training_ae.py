"""VGT-AE training learns, freezes what it should, self-distils, and resumes exactly after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import builtin_preset
from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.config import check_preset
from vgt_core.training.autoencoder import train_autoencoder
from vgt_core.training.run import log_file
from vgt_plugins.shapes.world import ShapesWorld


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    world = ShapesWorld(image_size=64, seed=3)
    for i in range(8):
        world.sample(i).image.save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")  # skipped and counted, never fatal
    return folder


def preset(**stage_overrides):
    p = builtin_preset("tiny-internvl3")
    for stage in ("stage1", "stage2"):
        p["train_ae"][stage].update(
            batch_size=4, log_every=1, checkpoint_every=1000, sample_every=1000, perceptual_weight=0.0, gan_weight=0.0
        )
        p["train_ae"][stage].update(stage_overrides.get(stage, {}))
    return check_preset(p, "test", "tiny")


def test_stage1_lowers_reconstruction_loss_by_a_large_factor(image_folder, tmp_path):
    out = train_autoencoder(
        preset(stage1={"lr": 3e-3, "end_lr": 1e-4, "warmup_steps": 5}), tmp_path / "s1", stage=1, data=image_folder, steps=300, progress=False
    )
    log = log_file(tmp_path / "s1")
    first, last = log[0]["mse"], sum(r["mse"] for r in log[-10:]) / 10
    assert last < first / 10, (first, last)
    assert log[-1]["skipped_images"] > 0  # the corrupt file was met, counted and skipped
    assert (out / "model.safetensors").exists() and (tmp_path / "s1" / "samples").exists()


def test_distillation_is_zero_at_step_0_and_grows_when_the_encoder_moves(image_folder, tmp_path):
    train_autoencoder(preset(stage1={"encoder_lr_mult": 0.5, "lr": 3e-3}), tmp_path / "moving", data=image_folder, steps=20, progress=False)
    log = log_file(tmp_path / "moving")
    assert log[0]["distill"] == 0.0
    assert log[-1]["distill"] > 1e-6
    assert all(b["distill"] >= 0 for b in log)
    train_autoencoder(preset(stage1={"encoder_lr_mult": 0.0, "lr": 3e-3}), tmp_path / "frozen", data=image_folder, steps=20, progress=False)
    assert all(r["distill"] == 0.0 for r in log_file(tmp_path / "frozen"))  # a frozen encoder never drifts


def test_stage2_with_encoder_multiplier_0_leaves_every_encoder_weight_identical(image_folder, tmp_path):
    p = preset(stage1={"lr": 3e-3}, stage2={"encoder_lr_mult": 0.0, "latent_norm": "batchnorm", "noise_sigma": 0.3})
    train_autoencoder(p, tmp_path / "s1", stage=1, data=image_folder, steps=10, progress=False)
    out = train_autoencoder(p, tmp_path / "s2", stage=2, init=tmp_path / "s1", data=image_folder, steps=15, progress=False)
    before, after = load_file(str(tmp_path / "s1" / "model" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    encoder = [k for k in before if k.startswith("encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(before["projection.down.1.weight"], after["projection.down.1.weight"])  # the rest trained
    ae = VGTAutoencoder.from_pretrained(out)
    assert ae.latent_norm.kind == "batchnorm" and ae.noise_sigma == 0.3


def _cli_train(args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "vgt_core.cli", "train-ae", "--quiet", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(image_folder, tmp_path):
    args = [
        "--preset", "tiny-internvl3", "--data", str(image_folder), "--steps", "24",
        "--set", "train_ae.stage1.batch_size=4", "--set", "train_ae.stage1.checkpoint_every=8",
        "--set", "train_ae.stage1.gan_start=10", "--set", "train_ae.stage1.lecam_weight=0.001",
        "--set", "train_ae.stage1.ema_decay=0.9", "--set", "train_ae.stage1.noise_sigma=0.2",
    ]  # GAN, LeCam, EMA and noise are all live around the checkpoint the run resumes from
    straight = _cli_train([*args, "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()

    killed = _cli_train([*args, "--out", str(tmp_path / "killed")])
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "checkpoints" / "step-00000016").exists():
        assert killed.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "model").exists()  # it really died mid-run

    refused = _cli_train([*args, "--out", str(tmp_path / "killed")])
    assert refused.wait(timeout=600) == 2 and b"--resume" in refused.stderr.read()  # nothing is overwritten
    resumed = _cli_train([*args, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()

    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in log_file(tmp_path / "killed")]
    assert steps == sorted(set(steps))  # the log has no duplicated steps after the resume
    skipped = log_file(tmp_path / "straight")[-1]["skipped_images"]
    assert skipped > 0 and log_file(tmp_path / "killed")[-1]["skipped_images"] == skipped  # the count survives
