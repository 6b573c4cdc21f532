"""Muon for a model's hidden weight matrices and AdamW for the rest, stepped as one optimizer (``train_ar.optimizer``).

Muon (Jordan et al., 2024; Moonlight, Liu et al., 2025) replaces each matrix's update by the orthogonalised
momentum. vgt uses torch's own ``torch.optim.Muon`` with Moonlight's ``match_rms_adamw`` scaling, so the AdamW
learning rate, weight decay and schedule carry over unchanged. Two things torch leaves to its caller are written
here: which parameters take Muon (it accepts matrices only, and embeddings and output layers are better left to
AdamW), and stepping the two optimizers as one, so that one LR schedule, one gradient clip, accelerate's ``prepare``
and one checkpoint cover both.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` over the hidden matrices and ``torch.optim.AdamW`` over every other parameter, as one
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
    ):
        named = [(n, p) for n, p in named if p.requires_grad]
        matrices = [p for _, p in named if id(p) in hidden]
        if not matrices:
            raise ValueError("Muon found no hidden weight matrix to train (no trainable nn.Linear layer)")
        rest = optimizer_groups(((n, p) for n, p in named if id(p) not in hidden), weight_decay)
        # No Optimizer.__init__: the groups and states live in the two optimizers; this class only forwards.
        self.defaults = {"lr": lr}
        self.muon = torch.optim.Muon(
            matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
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
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
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
