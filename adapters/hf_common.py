"""Options and loading shared by every transformers-backed component."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from transformers import AutoConfig, PretrainedConfig

from vgt_core.registry import Options


class PretrainedOptions(Options):
    """Where a component's weights come from."""

    pretrained: str | None = Field(None, description="hub id or local folder (from_pretrained)")
    config: dict[str, Any] | None = Field(
        None, description="a transformers/diffusers config as a dict: the architecture when `pretrained` is unset"
    )
    load_weights: bool = Field(True, description="false: build the architecture only (weights come from elsewhere)")
    revision: str | None = None
    dtype: str | None = Field(None, description="e.g. bfloat16; default float32")


def torch_dtype(name: str | None) -> torch.dtype | None:
    return getattr(torch, name) if name else None


def resolve_config(options: PretrainedOptions, config_class: type[PretrainedConfig]) -> PretrainedConfig:
    """The model config named by ``pretrained`` (with ``config`` as overrides) or built from ``config`` alone."""
    if options.pretrained is not None:
        config = AutoConfig.from_pretrained(options.pretrained, revision=options.revision)
        if options.config:
            config = config_class.from_dict({**config.to_dict(), **options.config})
        return config
    if options.config is None:
        raise ValueError("set `pretrained` (a hub id or folder) or `config` (the architecture)")
    return config_class.from_dict(dict(options.config))


def load_model(model_class: Any, options: PretrainedOptions, config: PretrainedConfig) -> Any:
    """``from_pretrained`` when weights are wanted, else the bare architecture (randomly initialised)."""
    if options.pretrained is not None and options.load_weights:
        return model_class.from_pretrained(
            options.pretrained, config=config, revision=options.revision, dtype=torch_dtype(options.dtype) or torch.float32
        )
    model = model_class(config)
    return model.to(torch_dtype(options.dtype)) if options.dtype else model


def export_config(config: PretrainedConfig, folder: Path, options: PretrainedOptions, **extra: Any) -> dict:
    """Save ``config`` into ``folder`` and return options that rebuild the architecture from there."""
    config.save_pretrained(folder)
    update = {"pretrained": ".", "config": None, "load_weights": False, "revision": None, **extra}
    return type(options).model_validate({**options.model_dump(), **update}).model_dump(mode="json")


def is_local(path: str | None) -> bool:
    return path is not None and os.path.isdir(path)
