"""What only a GPU shows: bf16 training steps, the SDPA / flash-attention kernels, and a sharded (FSDP) save and
resume. Skipped without CUDA (tests/conftest.py); docs/distributed.md says which of them have run on a GPU."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import builtin_preset
from vgt_core.compose import build_autoencoder, build_generator
from vgt_core.config import check_preset
from vgt_shapes.world import ShapesWorld

pytestmark = pytest.mark.gpu


def tiny(attn: str = "sdpa"):
    p = builtin_preset("tiny-internvl3")
    p["backbone"]["options"]["attn_implementation"] = attn
    return check_preset(p, "test", "tiny")


def test_a_bf16_autocast_training_step_is_finite_and_close_to_fp32():
    preset = tiny()
    torch.manual_seed(0)
    ae = build_autoencoder(preset).cuda()
    gen = build_generator(preset, ae).cuda()
    latents = torch.randn(2, ae.latent_channels, *ae.grid, device="cuda")
    captions = ["a red circle", "a blue square"]
    torch.manual_seed(1)
    full = gen(latents, captions)
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = gen(latents, captions)
    half.backward()
    assert torch.isfinite(half) and all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)
    assert half.item() == pytest.approx(full.item(), rel=0.05)


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_fused_attention_matches_eager_attention(attn):
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    outputs = {}
    for name in ("eager", attn):
        torch.manual_seed(0)
        preset = tiny(name)
        ae = build_autoencoder(preset)
        gen = build_generator(preset, ae).cuda().to(torch.bfloat16).eval()
        prompts = gen.embed_prompts(["a red circle", "two blue squares and a star"])
        ids = prompts.mask.long().cumsum(-1).clamp(min=1) - 1
        outputs[name], _ = gen.backbone(prompts.embeds, prompts.mask, ids)
    mask = prompts.mask.bool()
    assert torch.allclose(outputs["eager"][mask].float(), outputs[attn][mask].float(), atol=3e-2, rtol=3e-2)


def test_fsdp_two_step_run_saves_and_resumes(tmp_path):
    """A 2-process FSDP2 run (needs 2 GPUs): checkpoints through accelerate's state API, --resume continues."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    world = ShapesWorld(image_size=64, seed=1)
    rows = []
    for i in range(8):
        sample = world.sample(i)
        sample.image.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "caption": sample.caption})
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
            "--main_process_port", str(port), "--fsdp_state_dict_type", "FULL_STATE_DICT", "-m", "vgt_core.cli"]  # fmt: skip
    ae = subprocess.run([*base, "train-ae", "--preset", "tiny-internvl3", "--data", str(tmp_path / "data.jsonl"), "--stage", "1",
                         "--steps", "2", "--set", "train_ae.stage1.batch_size=4", "--out", str(tmp_path / "ae"), "--quiet"],
                        capture_output=True, text=True)  # fmt: skip
    assert ae.returncode == 0, ae.stderr[-3000:]
    args = ["train-ar", "--preset", "tiny-internvl3", "--autoencoder", str(tmp_path / "ae"), "--data", str(tmp_path / "data.jsonl"),
            "--set", "train_ar.batch_size=4", "--set", "train_ar.ema_decay=null", "--set", "train_ar.checkpoint_every=2",
            "--out", str(tmp_path / "ar"), "--quiet"]  # fmt: skip
    first = subprocess.run([*base, *args, "--steps", "2"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run([*base, *args, "--steps", "4", "--resume"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    state = load_file(str(tmp_path / "ar" / "model" / "generator" / "model.safetensors"))
    assert state and all(torch.isfinite(v.float()).all() for v in state.values())
    assert (tmp_path / "ar" / "checkpoints" / "step-00000004").exists()


def test_per_sample_draws_reach_the_gpu_without_a_host_sync_and_unchanged():
    """SampleDraws copies to the GPU from pinned memory, asynchronously: the values are the CPU draws, and a draw
    made while the GPU is busy returns before that work is done."""
    from vgt_core.randomness import SampleDraws

    def draws():
        return SampleDraws.for_batch(0, "test", 1, range(4))

    owner = torch.arange(4).repeat_interleave(3)
    expected = draws().randn(owner, 8)
    busy = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    for _ in range(20):
        busy = busy @ busy / 64  # queued work the draw must not wait for
    on_gpu = draws().randn(owner, 8, device="cuda")
    assert not torch.cuda.current_stream().query()  # the queued matmuls are still running: no sync happened
    assert torch.equal(on_gpu.cpu(), expected)
