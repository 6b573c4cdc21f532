"""Data parallelism through accelerate, on CPU: two gloo processes (launched by torchrun, as `accelerate launch`
does) share each global batch, train what one process trains on it, and resume exactly after a kill."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vgt_core.data import make_loader, open_dataset
from vgt_core.randomness import SampleDraws
from vgt_core.training.run import log_file
from vgt_shapes.world import ShapesWorld

AE = [
    "--preset", "tiny-internvl3", "--stage", "1", "--quiet",
    "--set", "train_ae.stage1.batch_size=4", "--set", "train_ae.stage1.log_every=1",
    "--set", "train_ae.stage1.gan_start=3", "--set", "train_ae.stage1.lecam_weight=0",
    "--set", "train_ae.stage1.noise_sigma=0.2", "--set", "train_ae.stage1.ema_decay=0.9",
    "--set", "train_ae.stage1.sample_every=1000",
]  # random crops and flips, latent noise, the GAN and the EMA are all live


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, *args: str, own_group: bool = False, niceness: int = 0) -> subprocess.Popen:
    """``vgt ARGS`` on ``processes`` CPU processes (torchrun sets the rank variables accelerate reads);
    ``own_group``: in a process group of its own, so that a kill can take torchrun and its workers at once;
    ``niceness``: at a lower priority, so that on a 2-core machine the test itself still gets a core when it must act."""
    runner = [sys.executable, "-m", "vgt_core.cli"]
    if processes > 1:
        runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                  "--master_port", str(free_port()), "-m", "vgt_core.cli"]  # fmt: skip
    return subprocess.Popen([*runner, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=own_group,
                            preexec_fn=(lambda: os.nice(niceness)) if niceness else None)


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err.decode()[-3000:]
    return out.decode()


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest weight difference {worst:.3g}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    world = ShapesWorld(image_size=64, seed=11)
    rows = []
    for i in range(12):
        sample = world.sample(i)
        sample.image.resize((80, 64)).save(root / f"{i}.png")  # wider than 64: random crops differ
        rows.append({"image": f"{i}.png", "caption": sample.caption})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


def test_each_process_gets_its_share_of_the_global_batch_with_the_same_draws(data):
    dataset = open_dataset(data, 16, random_flip=True, crop="random")
    whole = iter(make_loader(dataset, 4, seed=5)[0])
    shares = [iter(make_loader(dataset, 4, seed=5, rank=r, world=2)[0]) for r in range(2)]
    for step in range(1, 7):  # into the second epoch
        one, parts = next(whole), [next(s) for s in shares]
        assert set(parts[0]["indices"]).isdisjoint(parts[1]["indices"])
        assert parts[0]["indices"] + parts[1]["indices"] == one["indices"]
        assert parts[0]["positions"] + parts[1]["positions"] == one["positions"] == [0, 1, 2, 3]
        # a sample's random crop and flip do not depend on which process loads it
        assert torch.equal(torch.cat([p["images"] for p in parts]), one["images"])
        # nor do the model's draws
        split = [SampleDraws.for_batch(5, "train", step, p["positions"]) for p in parts]
        together = SampleDraws.for_batch(5, "train", step, one["positions"])
        owner = torch.arange(4).repeat_interleave(3)
        expected = together.randn(owner, 2)
        got = torch.cat([d.randn(torch.arange(2).repeat_interleave(3), 2) for d in split])
        assert torch.equal(got, expected)
    # resuming on another process count continues with the same global batch
    resumed = [next(iter(make_loader(dataset, 4, seed=5, start_state=6, rank=r, world=2)[0])) for r in range(2)]
    assert resumed[0]["indices"] + resumed[1]["indices"] == next(whole)["indices"]


@pytest.fixture(scope="module")
def ae_runs(data, tmp_path_factory) -> Path:
    """The same VGT-AE stage 1 on one process and on two."""
    root = tmp_path_factory.mktemp("ddp-ae")
    args = [*AE, "--data", str(data), "--steps", "8", "--set", "train_ae.stage1.checkpoint_every=4"]
    runs = {
        "one": launch(1, "train-ae", *args, "--out", str(root / "one")),
        "two": launch(2, "train-ae", *args, "--out", str(root / "two")),
    }
    for process in runs.values():
        finish(process)
    return root


def test_two_processes_train_what_one_trains_on_the_same_global_batch(ae_runs):
    one, two = weights(ae_runs / "one"), weights(ae_runs / "two")
    assert_close(one, two, atol=5e-5)  # only the order of the gradient sums differs
    assert any(not torch.equal(one[k], load_file(str(ae_runs / "one" / "checkpoints" / "step-00000004" / "model.safetensors"))[k]) for k in one)
    logged = [r["mse"] for r in log_file(ae_runs / "two")]
    assert logged == pytest.approx([r["mse"] for r in log_file(ae_runs / "one")], rel=1e-4)  # averaged over processes


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(ae_runs, data, tmp_path):
    args = [*AE, "--data", str(data), "--steps", "8", "--set", "train_ae.stage1.checkpoint_every=2", "--out", str(tmp_path / "killed")]
    # Killed after its first checkpoint (step 2), with six steps left. At a lower priority: on a 2-core machine the
    # two workers would otherwise starve this loop, and one CI run finished all 8 steps before the kill landed.
    killed = launch(2, "train-ae", *args, own_group=True, niceness=15)
    deadline = time.time() + 600
    while not (tmp_path / "killed" / "checkpoints" / "step-00000002").exists():
        assert killed.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.01)
    # torchrun and both workers at once: killed alone, torchrun left workers that (since CPU steps got faster)
    # could finish the last steps before they noticed
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    time.sleep(1)
    assert not (tmp_path / "killed" / "model").exists()
    finish(launch(2, "train-ae", *args, "--resume"))
    a, b = weights(ae_runs / "two"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in log_file(tmp_path / "killed")]
    assert steps == sorted(set(steps)) == list(range(1, 9))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_process_ar_training_with_accumulation_matches_one_process(ae_runs, data, tmp_path, optimizer):
    """Muon too: the processes split the orthogonalisation of the averaged gradients and broadcast their shares
    (``BatchedMuon``'s ``process_group``), so the two keep one model."""
    args = ["--preset", "tiny-internvl3", "--autoencoder", str(ae_runs / "one"), "--data", str(data), "--steps", "4", "--quiet",
            "--set", "train_ar.batch_size=4", "--set", "train_ar.log_every=1", "--set", "train_ar.sample_every=2",
            "--set", "train_ar.sample_count=2", "--set", "train_ar.prompt_dropout=0.5",
            "--set", f"train_ar.optimizer={optimizer}"]  # fmt: skip
    runs = [
        launch(1, "train-ar", *args, "--out", str(tmp_path / "one")),
        launch(2, "train-ar", *args, "--set", "train_ar.gradient_accumulation_steps=2", "--out", str(tmp_path / "two")),
    ]
    if optimizer == "muon":  # the scale of what the optimizer changes, for the tolerance below
        runs.append(launch(1, "train-ar", *args, "--set", "train_ar.optimizer=adamw", "--out", str(tmp_path / "adamw")))
    said = [finish(process) for process in runs]
    assert said[1].count("VGT model saved to") == 1  # the main process says it, not every rank
    def generator(run: str) -> dict[str, torch.Tensor]:
        return load_file(str(tmp_path / run / "model" / "generator" / "model.safetensors"))

    a, b = generator("one"), generator("two")
    if optimizer == "adamw":
        assert_close(a, b, atol=5e-5)
    else:
        # torch's Muon orthogonalises in bf16, which raises a gradient's faintest directions to full size: the
        # float rounding of summing two micro-batches instead of one batch moves single weights by up to ~1e-4
        # in 4 steps. Measured: 2 % of the distance between Muon's and AdamW's weights (0.0015 against 0.067).
        def distance(x: dict, y: dict) -> float:
            return sum((x[k] - y[k]).pow(2).sum() for k in x).sqrt().item()

        assert a.keys() == b.keys() and distance(a, b) < 0.1 * distance(a, generator("adamw"))
    assert (tmp_path / "two" / "samples" / "step-00000002.png").exists()  # every process drew its share
    losses = [r["loss"] for r in log_file(tmp_path / "two")]
    assert losses == pytest.approx([r["loss"] for r in log_file(tmp_path / "one")], rel=1e-4)


def test_a_samples_draws_do_not_depend_on_the_rest_of_its_batch():
    """Rows of a flattened layout (tokens of several samples, interleaved) draw from their own sample's stream, in
    row order: the same rows as a batch of that sample alone."""
    owner = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    together = SampleDraws.for_batch(1, "train", 3, [0, 1, 2]).randn(owner, 4)
    for sample in range(3):
        alone = SampleDraws.for_batch(1, "train", 3, [sample]).randn(torch.zeros(int((owner == sample).sum()), dtype=torch.long), 4)
        assert torch.equal(together[owner == sample], alone)


def test_a_one_process_run_resumes_on_two_processes_where_it_stopped(ae_runs, data, tmp_path):
    """The data position is global: a run checkpointed by one process continues on two with the next global batch,
    ending where the uninterrupted one-process run ends (up to the order of gradient sums)."""
    args = [*AE, "--data", str(data), "--set", "train_ae.stage1.checkpoint_every=4", "--out", str(tmp_path / "moved")]
    finish(launch(1, "train-ae", *args, "--steps", "4"))  # steps 1-4 are in the warm-up, as in the 8-step run
    finish(launch(2, "train-ae", *args, "--steps", "8", "--resume"))
    assert_close(weights(ae_runs / "one"), weights(tmp_path / "moved"), atol=5e-5)
    assert [r["step"] for r in log_file(tmp_path / "moved")] == list(range(1, 9))
