"""What every diffusers-backed component shares: where its autoencoder comes from, and its offline export.

A component keeps one half of a diffusers autoencoder (the decoder for ``dcae``/``sdvae``, the encoder for
``dcae-encoder``); both load the whole autoencoder the same way and export its config the same way, so that a
saved VGT-AE rebuilds the architecture from its own folder without the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vgt_adapters.hf_common import torch_dtype
from vgt_adapters.options import DiffusersOptions  # noqa: F401 -- re-exported
from vgt_core.checkpointing import checkpoint_forward


def diffusers_class(model_class: str | type) -> type:
    """A diffusers model class, given by name so that registering a plugin does not import diffusers (seconds);
    it is imported when a component is built."""
    if not isinstance(model_class, str):
        return model_class
    import diffusers

    return getattr(diffusers, model_class)


def load_autoencoder(model_class: str | type, options: DiffusersOptions) -> nn.Module:
    """The whole autoencoder: pretrained weights, or the architecture of ``pretrained``/``config`` (random)."""
    model_class = diffusers_class(model_class)
    if options.pretrained is not None and options.load_weights:
        return model_class.from_pretrained(
            options.pretrained, subfolder=options.subfolder, revision=options.revision,
            torch_dtype=torch_dtype(options.dtype) or torch.float32,
        )
    if options.pretrained is not None:
        config = model_class.load_config(options.pretrained, subfolder=options.subfolder)
    elif options.config is not None:
        config = dict(options.config)
    else:
        raise ValueError("set `pretrained` (a hub id or folder) or `config` (the architecture)")
    return model_class.from_config(config)


def keep_half(half: nn.Module, options: DiffusersOptions) -> nn.Module:
    """The kept half in the requested dtype (float32 unless ``dtype`` is set)."""
    return half.to(torch_dtype(options.dtype)) if options.dtype else half


def checkpoint_half(half: nn.Module, blocks: str) -> None:
    """Activation checkpointing for one half of a diffusers autoencoder.

    Where diffusers supports it (SD-VAE's ``Encoder``/``Decoder`` read a ``gradient_checkpointing`` flag), set the
    flag and checkpoint function as ``ModelMixin.enable_gradient_checkpointing`` does; where it does not
    (``AutoencoderDC`` refuses), checkpoint each of the half's ``blocks`` (``up_blocks``/``down_blocks``)."""
    flagged = [m for m in half.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
    if flagged:
        for module in flagged:
            module._gradient_checkpointing_func = _checkpoint_call
            module.gradient_checkpointing = True
        return
    stages = getattr(half, blocks, None)
    if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
        raise ValueError(f"{type(half).__name__} has no `{blocks}` to checkpoint")
    for stage in stages:
        checkpoint_forward(stage)


def _checkpoint_call(module: nn.Module, *args: Any) -> Any:
    return checkpoint(module.__call__, *args, use_reentrant=False)


def export_autoencoder(model_class: str | type, ae_config: dict, options: DiffusersOptions, folder: Path) -> dict:
    """Write the autoencoder's config into ``folder``; return options that rebuild it from there, no weights."""
    from vgt_core.serialization import write_json

    config = {k: v for k, v in ae_config.items() if not k.startswith("_")}
    config["_class_name"] = diffusers_class(model_class).__name__
    write_json(folder / "config.json", config)
    update = {"pretrained": ".", "subfolder": None, "config": None, "load_weights": False, "revision": None}
    return type(options).model_validate({**options.model_dump(), **update}).model_dump(mode="json")

