"""Options and loading shared by every transformers-backed component."""

from __future__ import annotations

import copy
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


LAYER_COUNT_KEYS = ("num_hidden_layers", "depth")


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in key by key: nested dicts merge, anything else replaces.

    Neither argument is mutated and the result shares no dict or list with them (YAML anchors share one object
    between presets and components, so an in-place merge would leak into the others)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_layer_overrides(base: dict, overrides: dict, source: str, path: str = "") -> None:
    """A layer count in ``overrides`` (``text_config.num_hidden_layers``, a vision ``depth``) must keep at least one
    layer and at most as many as ``source``'s checkpoint has: ``from_pretrained`` then loads the first layers'
    weights and leaves the rest of the checkpoint out."""
    for key, value in overrides.items():
        where = f"{path}{key}"
        if isinstance(value, dict):
            below = base.get(key)
            check_layer_overrides(below if isinstance(below, dict) else {}, value, source, f"{where}.")
        elif key in LAYER_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"config {where}={value}: at least one layer must stay")
            if isinstance(base.get(key), int) and value > base[key]:
                raise ValueError(
                    f"config override {where}={value}: {source} has only {base[key]} layers there; "
                    f"an override can keep its first layers, not add new ones"
                )


def _trim_layer_types(merged: dict, overrides: dict) -> dict:
    """transformers checks ``len(layer_types) == num_hidden_layers``: when an override only changes the count, keep
    the types of the layers that stay (the first ones)."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            _trim_layer_types(merged[key], value)
    layers, types = merged.get("num_hidden_layers"), merged.get("layer_types")
    if "num_hidden_layers" in overrides and "layer_types" not in overrides and isinstance(types, list):
        if isinstance(layers, int) and 0 < layers <= len(types):
            merged["layer_types"] = types[:layers]
    return merged


def resolve_config(options: PretrainedOptions, config_class: type[PretrainedConfig]) -> PretrainedConfig:
    """The model config named by ``pretrained`` (with ``config`` deep-merged over it: ``{text_config:
    {num_hidden_layers: 18}}`` changes that one key) or built from ``config`` alone."""
    if options.pretrained is not None:
        config = AutoConfig.from_pretrained(options.pretrained, revision=options.revision)
        if options.config:
            base = config.to_dict()
            check_layer_overrides(base, options.config, options.pretrained)
            config = config_class.from_dict(_trim_layer_types(deep_merge(base, options.config), options.config))
        return config
    if options.config is None:
        raise ValueError("set `pretrained` (a hub id or folder) or `config` (the architecture)")
    check_layer_overrides({}, options.config, "the config")
    return config_class.from_dict(copy.deepcopy(options.config))


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
