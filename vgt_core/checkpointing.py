"""Activation (gradient) checkpointing: one switch for a whole model, each component doing its own part.

The training config's ``gradient_checkpointing`` is the only user switch. Components that can recompute their
activations implement ``enable_gradient_checkpointing()`` (``protocols.SupportsGradientCheckpointing``):
transformers models call ``gradient_checkpointing_enable``, diffusers halves set diffusers' flag or, where
diffusers has none (DC-AE), checkpoint their blocks with ``checkpoint_forward``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

METHOD = "enable_gradient_checkpointing"


def enable_gradient_checkpointing(module: nn.Module) -> list[str]:
    """Call ``enable_gradient_checkpointing()`` on every component of ``module`` that has the method (``module``
    itself included), outermost first: a component handles its own sub-modules, so nothing below it is visited.
    Returns the qualified names of the components switched on ("" for ``module`` itself); warns when none is."""
    enabled: list[str] = []

    def visit(name: str, sub: nn.Module) -> None:
        method = getattr(sub, METHOD, None)
        # diffusers' ModelMixin has a method of this name that raises where the model does not support it
        # (AutoencoderDC): go below such a model instead
        if callable(method) and getattr(sub, "_supports_gradient_checkpointing", True):
            method()
            enabled.append(name)
            return
        for child_name, child in sub.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", module)
    if not enabled:
        warnings.warn(
            f"gradient checkpointing is on but no component of {type(module).__name__} supports it "
            f"(none has an {METHOD}() method)",
            stacklevel=2,
        )
    return enabled


def checkpoint_forward(module: nn.Module) -> None:
    """Make ``module`` recompute its activations in the backward pass instead of keeping them
    (``torch.utils.checkpoint``, non-reentrant), whenever gradients are being recorded; unchanged otherwise.

    The module's ``forward`` is wrapped in place, so its parameters and state-dict keys stay the same. Calling it
    twice does nothing more."""
    if getattr(module, "_vgt_checkpointed", False):
        return
    forward = module.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed
    module._vgt_checkpointed = True
