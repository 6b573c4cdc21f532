"""Muon for a model's hidden weight matrices and AdamW for the rest, stepped as one optimizer (``train_ar.optimizer``).

Muon (Jordan et al., 2024; Moonlight, Liu et al., 2025) replaces each matrix's update by the orthogonalised
momentum. vgt uses torch's own ``torch.optim.Muon`` with Moonlight's ``match_rms_adamw`` scaling, so the AdamW
learning rate, weight decay and schedule carry over unchanged. Three things torch leaves to its caller are written
here: which parameters take Muon (it accepts matrices only, and embeddings and output layers are better left to
AdamW); stepping the two optimizers as one, so that one LR schedule, one gradient clip, accelerate's ``prepare``
and one checkpoint cover both; and running the Newton–Schulz iterations of same-shaped matrices as one batched
product (``BatchedMuon``), which torch's Muon does one matrix at a time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vgt_core.training.run import optimizer_groups


def hidden_matrices(model: nn.Module, outputs: Iterable[nn.Module] = ()) -> set[int]:
    """Ids of the trainable weights of ``model``'s ``nn.Linear`` layers, except those of ``outputs`` and any weight
    shared with an ``nn.Embedding`` (tied input/output embeddings). Embeddings, norms, biases, convolutions and
    position tables are not hidden matrices: Muon's orthogonalised step is for maps between hidden spaces."""
    excluded = {id(m.weight) for m in outputs}
    excluded |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in excluded
    }


def orthogonalise(update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """The quintic Newton–Schulz iteration of torch's Muon (bf16, a wide orientation, the Frobenius norm scaled to
    1), applied to every matrix of a ``(..., rows, cols)`` stack at once."""
    a, b, c = coefficients
    x = update.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The factor torch's Muon applies to the learning rate of a ``shape`` matrix (its ``adjust_lr_fn`` options)."""
    rows, cols = shape[:2]
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(rows / cols)  # "spectral_unclamped", the only other value torch's Muon accepts


BATCH_ELEMENTS = 2**25
"""At most this many elements in one batched Newton–Schulz call (128 MiB of fp32 per stacked copy): a large
model's same-shaped matrices (a 1.5B LM's 56 MLP matrices are 0.8G elements) are orthogonalised a few at a time."""


def _chunks(index: list[int], size: int, world: int) -> list[list[int]]:
    """``index`` (same-shaped matrices of ``size`` elements) in batches of at most ``BATCH_ELEMENTS``, and in at least
    ``world`` batches where there are enough matrices, so that every process gets a share."""
    per_call = max(1, min(BATCH_ELEMENTS // size, math.ceil(len(index) / world)))
    return [index[i : i + per_call] for i in range(0, len(index), per_call)]


def _balanced(costs: list[float], world: int) -> list[int]:
    """The process of each job: the costliest first, each to the least loaded process (the same on every process)."""
    load, owner = [0.0] * world, [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: -costs[k]):
        owner[k] = min(range(world), key=load.__getitem__)
        load[owner[k]] += costs[k]
    return owner


def _closure_loss(closure) -> Tensor | None:
    """torch's optimizer convention: a ``step(closure)`` re-evaluates the loss, with gradients on, and returns it."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _tall(matrix: Tensor) -> bool:
    return matrix.size(0) > matrix.size(1)


def _orthogonalised(buffers: list[Tensor], grads: list[Tensor], group: dict) -> Tensor:
    """The orthogonalised (Nesterov) momentum of same-shaped matrices, stacked, each in its wide orientation."""
    wide = [(b.mT, g.mT) if _tall(b) else (b, g) for b, g in zip(buffers, grads)]
    update = torch.stack([b for b, _ in wide])
    if group["nesterov"]:
        update = torch.stack([g for _, g in wide]).lerp_(update, group["momentum"])
    return orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"]).contiguous()


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with one batched Newton–Schulz call per matrix shape instead of one call per matrix.

    The algorithm, options and state (``momentum_buffer``, so checkpoints move between the two) are torch's; only
    the loop differs. A model's matrices come in a handful of shapes (the demo's 44 in 7, a matrix and its transpose
    counting as one), and at small and medium sizes the per-call cost is what torch's loop pays. The results equal
    torch's up to the rounding of the batched bf16 products (on the CPUs measured, bit for bit).
    ``pytorch_optimizer`` and others ship batched Muons with their own variants; this one keeps torch's.

    With a ``process_group`` (data-parallel training: every process holds the same averaged gradients), the batches
    are split between the processes, each orthogonalises its share and broadcasts it, and every process applies all
    updates: the model stays one, and each process does ~1/world of the iterations instead of all of them.
    """

    def __init__(self, params, *args, process_group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.process_group = process_group

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = _closure_loss(closure)
        split = self.process_group is not None and dist.get_world_size(self.process_group) > 1
        world, rank = (dist.get_world_size(self.process_group), dist.get_rank(self.process_group)) if split else (1, 0)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse or torch.is_complex(p) for p in params):
                raise RuntimeError("Muon supports dense real gradients only")
            grads = [p.grad for p in params]
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            lr = group["lr"]
            torch._foreach_lerp_(buffers, grads, 1 - group["momentum"])
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            # Torch's iteration runs on the wide orientation of each matrix, so a (m, n) and an (n, m) matrix share a batch.
            same_shape: dict[tuple, list[int]] = defaultdict(list)
            for i, p in enumerate(params):
                same_shape[(min(p.shape), max(p.shape), p.device, p.dtype)].append(i)
            jobs = [chunk for same in same_shape.values() for chunk in _chunks(same, params[same[0]].numel(), world)]
            shapes = [(len(index), min(params[index[0]].shape), max(params[index[0]].shape)) for index in jobs]
            owners = _balanced([n * rows * rows * cols for n, rows, cols in shapes], world)
            results, pending = [], []
            for index, shape, owner in zip(jobs, shapes, owners):
                if owner == rank:
                    update = _orthogonalised([buffers[i] for i in index], [grads[i] for i in index], group)
                else:
                    update = torch.empty(shape, dtype=torch.bfloat16, device=params[index[0]].device)
                if split:
                    source = dist.get_global_rank(self.process_group, owner)
                    pending.append(dist.broadcast(update, src=source, group=self.process_group, async_op=True))
                results.append(update)
            for work in pending:
                work.wait()
            for index, update in zip(jobs, results):
                for i, u in zip(index, update.unbind(0)):
                    scale = lr * lr_ratio(group["adjust_lr_fn"], params[i].shape)
                    params[i].add_(u.mT if _tall(params[i]) else u, alpha=-scale)
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon (``BatchedMuon``) over the hidden matrices and ``torch.optim.AdamW`` over every other parameter, as one
    optimizer: ``param_groups`` are the two optimizers' own groups (a schedule that sets ``lr`` sets both, also
    after ``load_state_dict`` replaced them), and the state dict holds both states."""

    def __init__(
        self,
        named: Iterable[tuple[str, nn.Parameter]],
        hidden: set[int],
        *,
        lr: float,
        betas: tuple[float, float],
        weight_decay: float,
        momentum: float = 0.95,
        fused: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ):
        named = [(n, p) for n, p in named if p.requires_grad]
        matrices = [p for _, p in named if id(p) in hidden]
        if not matrices:
            raise ValueError("Muon found no hidden weight matrix to train (no trainable nn.Linear layer)")
        rest = optimizer_groups(((n, p) for n, p in named if id(p) not in hidden), weight_decay)
        # No Optimizer.__init__: the groups and states live in the two optimizers; this class only forwards.
        self.defaults = {"lr": lr}
        self.muon = BatchedMuon(
            matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw", process_group=process_group
        )
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, **({"fused": True} if fused else {})) if rest else None
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = _closure_loss(closure)
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw is not None else None}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("not a MuonWithAdamW state (was this checkpoint written with train_ar.optimizer=adamw?)")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])

    def __repr__(self) -> str:
        return f"MuonWithAdamW(muon: {sum(len(g['params']) for g in self.muon.param_groups)} matrices, adamw: " + (
            f"{sum(len(g['params']) for g in self.adamw.param_groups)} tensors)" if self.adamw is not None else "none)"
        )
