"""VGT-AE training learns, freezes what it should, self-distils, and resumes exactly after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import builtin_preset
from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.config import AEStage, check_preset
from vgt_core.errors import ConfigError, VGTError
from vgt_core.training import autoencoder as ae_training
from vgt_core.training.autoencoder import train_autoencoder
from vgt_core.training.run import log_file
from vgt_shapes.world import ShapesWorld


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    world = ShapesWorld(image_size=64, seed=3)
    for i in range(8):  # wider than the 64 px the tiny model sees, so random crops differ
        world.sample(i).image.resize((80, 64)).save(folder / f"{i}.png")
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


def test_logged_mse_is_a_quarter_in_the_unit_range(image_folder, tmp_path):
    """Same model, same batch: upstream's [0, 1] MSE is 1/4 of the [-1, 1] one (step 1, before any update)."""
    mse = {}
    for loss_range in ("unit", "signed"):
        p = preset(stage1={"loss_range": loss_range})
        train_autoencoder(p, tmp_path / loss_range, data=image_folder, steps=1, progress=False)
        mse[loss_range] = log_file(tmp_path / loss_range)[0]["mse"]
    assert mse["unit"] == pytest.approx(mse["signed"] / 4, rel=1e-5)


def test_random_crops_change_what_the_model_sees_from_epoch_to_epoch(tmp_path, monkeypatch):
    seen = []
    real_open = ae_training.open_dataset

    class Recording(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, index):
            return self.load(index)

        def load(self, index, generator=None):
            item = self.inner.load(index, generator)
            seen.append(item["image"])
            return item

    def recording_open(*args, **kwargs):
        return Recording(real_open(*args, **kwargs))

    monkeypatch.setattr(ae_training, "open_dataset", recording_open)
    photo = Image.new("RGB", (160, 64))
    photo.putdata([(x, 255 - x, (3 * x) % 256) for _ in range(64) for x in range(160)])  # every column differs
    for crop in ("random", "center"):
        seen.clear()
        stage = {"crop": crop, "random_flip": False, "batch_size": 1, "distill_weight": 0.0}
        train_autoencoder(preset(stage1=stage), tmp_path / crop, data=[{"image": photo, "caption": ""}], steps=3, progress=False)
        seen[:] = seen[-3:]  # the three training reads (a check before training may read the data once)
        if crop == "random":
            assert not torch.equal(seen[0], seen[1]) or not torch.equal(seen[1], seen[2])
        else:
            assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])


def test_gan_start_as_a_fraction_moves_with_steps(image_folder, tmp_path):
    stage = AEStage(steps=100_000, gan_start=0.3)
    assert stage.gan_start_step == 30_000  # upstream's stage 1
    assert stage.model_copy(update={"steps": 300}).gan_start_step == 90
    assert AEStage(steps=300, gan_start=40).gan_start_step == 40  # an integer is a step
    assert AEStage().gan_start_step == 30_000

    p = preset(stage1={"gan_weight": 0.1, "gan_start": 0.5})
    train_autoencoder(p, tmp_path / "run", data=image_folder, steps=6, progress=False)  # --steps 6: GAN after step 3
    assert [r["step"] for r in log_file(tmp_path / "run") if "gan_g" in r] == [4, 5, 6]


@pytest.mark.parametrize("value", [1.5, -0.2, -3, True])
def test_a_bad_gan_start_names_its_key(value):
    with pytest.raises(ConfigError, match=r"train_ae\.stage1\.gan_start"):
        preset(stage1={"gan_start": value})


def test_stage2_without_a_teacher_is_an_error_naming_the_file(image_folder, tmp_path):
    p = preset(stage1={"lr": 3e-3})
    train_autoencoder(p, tmp_path / "s1", stage=1, data=image_folder, steps=2, progress=False)
    # --init RUN/model finds RUN/teacher.safetensors too
    train_autoencoder(p, tmp_path / "s2", stage=2, init=tmp_path / "s1" / "model", data=image_folder, steps=1, progress=False)
    assert (tmp_path / "s2" / "teacher.safetensors").exists()

    (tmp_path / "s1" / "teacher.safetensors").unlink()
    with pytest.raises(VGTError, match=r"teacher\.safetensors.*distill_weight=0"):
        train_autoencoder(p, tmp_path / "s2b", stage=2, init=tmp_path / "s1", data=image_folder, steps=1, progress=False)
    assert not (tmp_path / "s2b").exists()  # refused before writing anything
    no_distill = preset(stage2={"distill_weight": 0.0})
    train_autoencoder(no_distill, tmp_path / "s2c", stage=2, init=tmp_path / "s1", data=image_folder, steps=1, progress=False)
    assert not (tmp_path / "s2c" / "teacher.safetensors").exists()  # no teacher is invented and passed on
