"""``train_ar.optimizer: muon``: torch's Muon over the hidden matrices, AdamW over the rest, stepped as one.

What could break: a parameter trained twice or not at all, an LR schedule that reaches one of the two optimizers
(or stops reaching Muon after a checkpoint is loaded: ``load_state_dict`` replaces an optimizer's groups), updates
that differ from torch's own optimizers, and a model that does not learn with it. The exact resume of a killed run
is in test_cli_ar.py, the two-process run in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from test_ar_learning import CAPTIONS, GRID, assert_each_prompt_returns_its_own_latents, one_thread, overfit  # noqa: F401 (fixture)
from vgt_core.generator import VGTGenerator
from vgt_core.training.muon import BatchedMuon, MuonWithAdamW, hidden_matrices, orthogonalise
from vgt_core.training.run import cosine_with_warmup, optimizer_groups
from conftest import builtin_preset


def tiny_generator() -> VGTGenerator:
    p = builtin_preset("tiny-internvl3")
    return VGTGenerator.from_specs(p["backbone"], p["sampler"], latent_norm="layernorm", options=p["generator"])


class Toy(nn.Module):
    """An embedding, a tied output, a hidden linear layer, a norm and an output layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)
        self.tied = nn.Linear(8, 10, bias=False)
        self.tied.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.hidden(self.embed(x)).relu())
        return self.out(h).sum() + self.tied(h).logsumexp(-1).sum()


def test_muon_takes_the_hidden_matrices_and_adamw_every_other_parameter_once():
    gen = tiny_generator()
    hidden = hidden_matrices(gen, outputs=gen.output_layers)
    names = {n for n, p in gen.named_parameters() if id(p) in hidden}
    lm = "backbone.lm.layers.0."
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert f"{lm}{part}.weight" in names
    assert {"head.blocks.0.mlp.0.weight", "head.blocks.0.modulation.1.weight", "head.input_proj.weight", "latent_in.weight"} <= names
    assert all(n.endswith(".weight") for n in names)  # no bias, no norm
    assert not {"head.final.weight", "position_grid", "backbone.lm.embed_tokens.weight"} & names
    assert not any("norm" in n.split(".")[-2] or "grid" in n for n in names)

    opt = MuonWithAdamW(gen.named_parameters(), hidden, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    muon = [p for g in opt.muon.param_groups for p in g["params"]]
    rest = [p for g in opt.adamw.param_groups for p in g["params"]]
    trainable = [p for p in gen.parameters() if p.requires_grad]
    assert len(muon) == len(hidden) and all(p.ndim == 2 for p in muon)
    assert sorted(map(id, muon + rest)) == sorted(map(id, trainable))  # each once, none left out


def test_its_updates_are_torchs_muon_and_adamw_and_a_tied_embedding_stays_with_adamw():
    torch.manual_seed(0)
    model, ref = Toy(), Toy()
    ref.load_state_dict(model.state_dict())
    hidden = hidden_matrices(model, outputs=[model.out])
    assert hidden == {id(model.hidden.weight)}  # the tied output shares the embedding's weight: not hidden

    opt = MuonWithAdamW(model.named_parameters(), hidden, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    muon = torch.optim.Muon([ref.hidden.weight], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(optimizer_groups(((n, p) for n, p in ref.named_parameters() if n != "hidden.weight"), 0.1), lr=1e-2, betas=(0.9, 0.95))
    x = torch.randint(0, 10, (4, 5))
    for _ in range(3):
        for m, optimizers in ((model, [opt]), (ref, [muon, adamw])):
            m(x).backward()
            for o in optimizers:
                o.step()
                o.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.hidden.weight, Toy().hidden.weight)


@pytest.mark.parametrize("nesterov, adjust_lr_fn, batch_elements", [(True, "match_rms_adamw", None), (False, None, None), (True, "spectral_unclamped", 300)])
def test_batched_muon_steps_as_torchs_muon_and_shares_its_checkpoints(nesterov, adjust_lr_fn, batch_elements, monkeypatch):
    """Same-shaped matrices (a matrix and its transpose alike) go through one batched Newton–Schulz call, or a few
    when they exceed ``BATCH_ELEMENTS``: each must still get its own update (a mix-up or a tall matrix left
    transposed would move the weights by a whole step). Tall, wide and square, three of a shape."""
    from vgt_core.training import muon

    calls = []
    monkeypatch.setattr(muon, "orthogonalise", lambda update, *a: calls.append(tuple(update.shape)) or orthogonalise(update, *a))
    if batch_elements:
        monkeypatch.setattr(muon, "BATCH_ELEMENTS", batch_elements)
    torch.manual_seed(0)
    shapes = [(16, 8), (8, 16), (12, 12), (16, 8), (12, 12), (16, 8), (5, 7)]
    weights = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [w.detach().clone().requires_grad_() for w in weights]
    options = {"lr": 0.02, "weight_decay": 0.1, "nesterov": nesterov, "adjust_lr_fn": adjust_lr_fn}
    batched, torchs = BatchedMuon(weights, **options), torch.optim.Muon(ref, **options)
    for step in range(3):
        before = [r.detach().clone() for r in ref]
        for w, r in zip(weights, ref):
            w.grad = torch.randn_like(w)
            r.grad = w.grad.clone()
        batched.step()
        torchs.step()
        for w, r, b in zip(weights, ref, before):
            assert (w - r).abs().max() <= 1e-2 * (r - b).abs().max(), (step, tuple(w.shape))
    per_step = sorted(calls[: len(calls) // 3])
    if batch_elements:  # at most 300 elements a call: the four 128-element matrices in two calls
        assert per_step == [(1, 5, 7), (2, 8, 16), (2, 8, 16), (2, 12, 12)]
    else:  # one call per shape, the tall (16, 8) matrices turned wide
        assert per_step == [(1, 5, 7), (2, 12, 12), (4, 8, 16)]
    weights[0].grad = None  # a matrix without a gradient this step is left alone
    kept = weights[0].detach().clone()
    batched.step()
    assert torch.equal(weights[0], kept)

    restored = BatchedMuon([w.detach().clone().requires_grad_() for w in ref], **options)
    restored.load_state_dict(torchs.state_dict())  # torch's checkpoint, read by the batched optimizer
    assert all(torch.equal(restored.state[p]["momentum_buffer"], torchs.state[r]["momentum_buffer"]) for p, r in zip(restored.param_groups[0]["params"], ref))


def test_a_schedule_sets_both_learning_rates_also_after_a_checkpoint_is_loaded():
    def build(model):
        opt = MuonWithAdamW(model.named_parameters(), hidden_matrices(model, [model.out]), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
        return opt, cosine_with_warmup(opt, warmup=2, total=10, floor=0.1)

    torch.manual_seed(0)
    model = Toy()
    opt, schedule = build(model)
    x = torch.randint(0, 10, (4, 5))
    for _ in range(4):
        model(x).backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    lrs = {g["lr"] for g in opt.param_groups}
    assert len(lrs) == 1 and lrs == {schedule.get_last_lr()[0]} and 0.001 < lrs.pop() < 0.01
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"]

    state, sched_state = opt.state_dict(), schedule.state_dict()
    resumed, resumed_schedule = build(model)
    resumed.load_state_dict(state)  # replaces both optimizers' group dicts
    resumed_schedule.load_state_dict(sched_state)
    for o in (opt, resumed):
        model(x).backward()
        o.step()
        o.zero_grad()
    schedule.step()
    resumed_schedule.step()
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in opt.param_groups]
    assert resumed.muon.param_groups[0]["lr"] == schedule.get_last_lr()[0]  # the schedule still reaches Muon
    assert torch.equal(resumed.state[model.hidden.weight]["momentum_buffer"], opt.state[model.hidden.weight]["momentum_buffer"])

    with pytest.raises(ValueError, match="not a MuonWithAdamW state"):
        resumed.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_queryar_learns_its_prompts_latents_with_muon():
    """The overfit task of test_ar_learning.py, trained with the optimizer the demo uses: each prompt returns its
    own latents (at 4e-3, the demo's LR; AdamW's test uses 5e-3)."""

    def muon(gen: VGTGenerator, lr: float) -> torch.optim.Optimizer:
        hidden = hidden_matrices(gen, outputs=gen.output_layers)
        return MuonWithAdamW(gen.named_parameters(), hidden, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    gen, latents = overfit("queryar", {"train_group_sizes": [1, 4, 16]}, lr=4e-3, make_optimizer=muon)
    assert_each_prompt_returns_its_own_latents(gen, latents, m=1)
    assert len(CAPTIONS) == latents.shape[0] and tuple(latents.shape[-2:]) == GRID


def test_sharded_runs_refuse_muon_and_name_the_way_out(monkeypatch, tmp_path):
    from vgt_core.errors import VGTError
    from vgt_core.training.run import TrainingRun

    monkeypatch.setattr(TrainingRun, "_unsharded", property(lambda self: False))
    run = TrainingRun.__new__(TrainingRun)
    run.accelerator = type("Acc", (), {"distributed_type": type("T", (), {"value": "FSDP"})()})()
    with pytest.raises(VGTError, match=r"train_ar.optimizer=muon needs whole weight matrices.*FSDP.*train_ar.optimizer=adamw"):
        run.muon(Toy().named_parameters(), set(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, key="train_ar.optimizer")


SPLIT_WORKER = """
import json, sys
import torch, torch.distributed as dist
from safetensors.torch import save_file
from vgt_core.training import muon

dist.init_process_group("gloo")
rank = dist.get_rank()
done = []
real = muon.orthogonalise
muon.orthogonalise = lambda update, *a: done.append(update.shape[0]) or real(update, *a)
torch.manual_seed(0)  # the same weights and gradients on every process, as after DDP's all-reduce
weights = [torch.randn(s, requires_grad=True) for s in SHAPES]
optimizer = muon.BatchedMuon(weights, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", process_group=dist.group.WORLD)
for _ in range(3):
    for w in weights:
        w.grad = torch.randn_like(w)
    optimizer.step()
save_file({str(i): w.detach() for i, w in enumerate(weights)}, f"{sys.argv[1]}/rank{rank}.safetensors")
open(f"{sys.argv[1]}/rank{rank}.json", "w").write(json.dumps(done))
dist.barrier()  # neither process tears gloo down while the other still talks to it
dist.destroy_process_group()
"""


def test_data_parallel_processes_split_the_orthogonalisation_and_keep_one_model(tmp_path):
    """Two gloo processes with the same gradients (what DDP leaves before the step): each orthogonalises a share of
    the matrices, and both end with the weights one process computes alone."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file
    from test_distributed import free_port

    shapes = [(16, 8), (8, 16), (12, 12), (16, 8), (12, 12), (16, 8), (5, 7), (32, 16)]
    (tmp_path / "worker.py").write_text(f"SHAPES = {shapes!r}\n" + SPLIT_WORKER)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                          str(tmp_path / "worker.py"), str(tmp_path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    torch.manual_seed(0)
    weights = [torch.randn(s, requires_grad=True) for s in shapes]
    alone = BatchedMuon(weights, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for w in weights:
            w.grad = torch.randn_like(w)
        alone.step()
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    for i, w in enumerate(weights):
        assert torch.equal(ranks[0][str(i)], ranks[1][str(i)])  # one model
        assert torch.allclose(ranks[0][str(i)], w.detach(), rtol=0, atol=1e-5), i  # the model one process trains
    shares = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(shares[0]) + sum(shares[1]) == 3 * len(shapes)  # every matrix orthogonalised once a step, by one process
    assert 0 < sum(shares[0]) < 3 * len(shapes) and 0 < sum(shares[1])  # by both processes, in turn
