"""Generation in bfloat16/float16: weights stored in the dtype, images finite and close to float32's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vgt_core.cli import main
from vgt_core.compose import build
from vgt_core.config import GenerationConfig
from vgt_core.pipeline import VGTPipeline, resolve_dtype


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    ae, gen = build("tiny-internvl3")
    folder = tmp_path_factory.mktemp("pipe") / "model"
    VGTPipeline(ae, gen, GenerationConfig(num_sampling_steps=2, guidance_scale=2.0, tokens_per_step=16)).save_pretrained(folder)
    return folder


def test_bfloat16_pipeline_holds_bf16_weights_and_makes_finite_images(model_folder):
    reference = VGTPipeline.from_pretrained(model_folder, dtype="float32")
    pipe = VGTPipeline.from_pretrained(model_folder, dtype="bfloat16")
    for model in (pipe.autoencoder, pipe.generator):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # buffers (normalisation constants, rotary frequencies) stay float32, as transformers keeps them
    assert pipe.autoencoder.encoder.mean.dtype == torch.float32
    expected = reference(["a red circle"], output_type="pt", seed=0, progress=False)
    got = pipe(["a red circle"], output_type="pt", seed=0, progress=False)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.isfinite(got).all()
    assert (got - expected).abs().mean() < 0.05  # the same image, up to bf16 rounding


def test_default_dtype_is_bf16_on_a_capable_gpu_and_float32_on_cpu(monkeypatch):
    assert resolve_dtype(None, "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype(None, "cuda:0") == torch.float32
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        resolve_dtype("bf16", "cpu")


def test_cli_generate_dtype(model_folder, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(model_folder), "--prompt", "a square", "--out", str(out), "--dtype", "float16", "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_folder), "--prompt", "a", "--out", str(out), "--dtype", "bf16"])
    assert "invalid choice: 'bf16'" in capsys.readouterr().err


PROBE = """
import sys, torch
import vgt_core.cli as cli
torch.set_num_threads(2)


def probe(args=None):  # a multiply of denormals, split across the intra-op threads: how many stayed non-zero
    print(int(((torch.full((1 << 22,), 1e-39) * 1.0) != 0).sum()))


if sys.argv[1] == "cli":
    cli.COMMANDS["generate"] = probe
    cli.main(["generate", "--model", "m", "--prompt", "p", "--out", "o.png"])
else:
    probe()
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores for torch's worker thread")
def test_the_cli_flushes_denormal_floats_in_every_thread_before_a_command_runs(tmp_path):
    def run(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    assert run("plain") == 1 << 22  # torch's default: computed, on x86's slow path
    # Flushed in the worker thread too: the flag is per thread, and torch's threads copy it when they start.
    assert run("cli") == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the flush is set where training runs on the CPU")
def test_a_cpu_training_run_flushes_denormal_floats(tmp_path):
    from vgt_core.training.run import TrainingRun

    torch.set_flush_denormal(False)
    denormal = torch.tensor([1e-39])  # below float32's smallest normal, 1.18e-38 (made while not flushed)
    try:
        assert (denormal * 1.0).item() != 0.0  # computed: x86's slow path
        TrainingRun(tmp_path / "run", precision="no", resume=False, progress=False, preset={}).finish()
        assert (denormal * 1.0).item() == 0.0  # flushed, as GPUs do (this thread; the CLI flushes before torch's threads start)
    finally:
        torch.set_flush_denormal(True)
