"""Options and loading shared by every transformers-backed component.

A component keeps one part of a VLM (the vision tower, or the language model). ``load_part`` builds the VLM's
architecture with its parameters on the meta device (no memory), keeps that part, and reads only the part's tensors
from the checkpoint, in the requested dtype: the other half is never materialised, neither in memory nor read
from disk (a sharded hub checkpoint downloads only the shards holding the part).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

from vgt_adapters.options import Dtype, PretrainedOptions  # noqa: F401 -- re-exported (torch-free module)


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
    layer and at most as many as ``source``'s checkpoint has: loading then reads the first layers' weights and
    leaves the rest of the checkpoint out."""
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


# ---------------------------------------------------------------------------------------------------------------
# One part of a VLM, and only it
# ---------------------------------------------------------------------------------------------------------------


def load_part(
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    keep: Callable[[PreTrainedModel], nn.Module],
    options: PretrainedOptions,
) -> nn.Module:
    """The part of ``model_class(config)`` that ``keep`` returns, in ``options.dtype`` (float32 by default).

    The whole architecture is built with its parameters on the meta device (buffers such as rotary frequencies
    are computed for real, as transformers does), ``keep`` picks the part, and only the part's parameters get
    memory: the part's tensors read from the checkpoint of ``options.pretrained`` (safetensors, key names mapped
    by transformers' own checkpoint conversions), or a fresh initialisation when there are no weights to load."""
    dtype = torch_dtype(options.dtype) or torch.float32
    with init_empty_weights():
        vlm = model_class(config)
    checkpoint_names = _checkpoint_key_mapper(vlm)  # needs the whole model: the mapping is the VLM's
    part = keep(vlm)
    prefix = next((name for name, module in vlm.named_modules() if module is part), None)
    if prefix is None:
        raise ValueError(f"keep() must return a sub-module of {model_class.__name__}")
    if options.pretrained is not None and options.load_weights:
        state = read_part_weights(options.pretrained, options.revision, part, prefix, checkpoint_names, dtype)
        part.load_state_dict(state, strict=True, assign=True)
    else:
        _initialise(part, dtype)
    del vlm
    return part


def _checkpoint_key_mapper(vlm: PreTrainedModel) -> Callable[[str], tuple[str, str | None]]:
    """checkpoint key -> (the model's key, the converter it needs or None), as ``from_pretrained`` maps them:
    hub checkpoints keep older layouts (``language_model.model.*``, ``visual.*``) that transformers renames."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(vlm)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    model_keys = vlm.state_dict()

    def mapper(key: str) -> tuple[str, str | None]:
        renamed, converter = rename_source_key(key, renamings, converters, vlm.base_model_prefix, model_keys)
        if renamed not in model_keys and key in model_keys:  # already in the model's own layout
            return key, None
        return renamed, converter

    return mapper


def checkpoint_files(source: str, revision: str | None) -> dict[str, str]:
    """Each tensor name of ``source``'s safetensors checkpoint -> the file (shard) that holds it; shards are
    fetched later, only those a part needs."""
    index = cached_file(source, SAFE_WEIGHTS_INDEX_NAME, revision=revision, _raise_exceptions_for_missing_entries=False)
    if index is not None:
        return dict(json.loads(Path(index).read_text())["weight_map"])
    single = cached_file(source, SAFE_WEIGHTS_NAME, revision=revision, _raise_exceptions_for_missing_entries=False)
    if single is None:
        raise FileNotFoundError(
            f"{source}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} (vgt reads safetensors only; a "
            f"pytorch_model.bin would have to be unpickled)"
        )
    with safe_open(single, framework="pt") as f:
        return {key: SAFE_WEIGHTS_NAME for key in f.keys()}


def read_part_weights(
    source: str,
    revision: str | None,
    part: nn.Module,
    prefix: str,
    checkpoint_names: Callable[[str], tuple[str, str | None]],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """The part's state dict, read tensor by tensor from ``source`` in ``dtype``; nothing else is read.

    Checkpoint keys outside the part are skipped unread, and so are layers beyond those the part keeps (a
    ``num_hidden_layers`` override keeps the first layers). A part key the checkpoint lacks, or a checkpoint key
    inside the part that fits nothing, is an error naming them."""
    wanted = part.state_dict(keep_vars=True)
    children = {name for name, _ in part.named_children()}
    head = f"{prefix}."
    where: dict[str, list[tuple[str, str]]] = {}  # file -> [(checkpoint key, part key)]
    unexpected, converted = [], []
    for key, file in checkpoint_files(source, revision).items():
        name, converter = checkpoint_names(key)
        if not name.startswith(head):
            continue  # the other half (or the LM head): never read
        local = name[len(head) :]
        if local in wanted:
            if converter is not None:
                converted.append(key)
            where.setdefault(file, []).append((key, local))
        elif local.split(".", 1)[0] in children and not _beyond_kept_layers(part, local):
            unexpected.append(key)
    missing = sorted(set(wanted) - {local for pairs in where.values() for _, local in pairs})
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors of the model are not in the checkpoint: {missing[:8]}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors fit nothing in the model: {sorted(unexpected)[:8]}")
    if converted:
        problems.append(f"tensors stored in a layout vgt does not convert (load them with transformers): {converted[:8]}")
    if problems:
        raise ValueError(f"{source} ({prefix}): " + "; ".join(problems))
    state: dict[str, torch.Tensor] = {}
    for file, pairs in where.items():
        path = cached_file(source, file, revision=revision)
        with safe_open(path, framework="pt") as f:
            for key, local in pairs:
                # a copy in any case: the part owns its memory, not pages of the mapped file
                tensor = f.get_tensor(key)
                state[local] = tensor.to(dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
    return state


def _beyond_kept_layers(root: nn.Module, key: str) -> bool:
    """Whether ``key`` names a layer past the end of one of ``root``'s layer lists (a trimmed layer)."""
    module: nn.Module | None = root
    for name in key.split(".")[:-1]:
        if isinstance(module, nn.ModuleList) and name.isdigit():
            if int(name) >= len(module):
                return True
            module = module[int(name)]
        else:
            module = module._modules.get(name) if module is not None else None
            if module is None:
                return False
    return False


def _initialise(part: nn.Module, dtype: torch.dtype) -> None:
    """Give a meta-built part fresh memory in ``dtype`` and transformers' initialisation for its model class;
    under ``with torch.device("meta")`` (counting parameters of full-size models) it stays on meta."""
    if torch.get_default_device().type == "meta":
        return
    if not isinstance(part, PreTrainedModel):
        raise TypeError(f"cannot initialise {type(part).__name__}: the kept part must be a transformers model")
    for name, param in list(part.named_parameters()):
        if param.is_meta:
            set_module_tensor_to_device(part, name, "cpu", value=torch.empty(param.shape, dtype=dtype), dtype=dtype)
    for module in part.modules():  # built on meta, every module was marked initialised; it is not, yet
        module._is_hf_initialized = False
    part.initialize_weights()


def checkpoint_transformer(model: PreTrainedModel) -> None:
    """transformers' activation checkpointing, non-reentrant (``activation_checkpointing_enable`` since 5.x; the
    older name elsewhere)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def text_config_name(config: PretrainedConfig) -> str | None:
    """The attribute of ``config`` holding its language model's config (``text_config`` in every VLM transformers
    ships), found through transformers' own ``get_text_config``; None for a text-only config."""
    text = config.get_text_config(decoder=True)
    return next((name for name in config.sub_configs if getattr(config, name, None) is text), None)


def other_sub_configs(config: PretrainedConfig, keep: str | None) -> tuple[str, ...]:
    """The sub-configs of ``config`` other than ``keep`` that are set (the halves a component never builds)."""
    return tuple(name for name in config.sub_configs if name != keep and getattr(config, name, None) is not None)


def child_name(parent: nn.Module, child: nn.Module) -> str:
    """The attribute under which ``parent`` holds ``child`` directly."""
    name = next((name for name, module in parent.named_children() if module is child), None)
    if name is None:
        raise ValueError(f"{type(child).__name__} is not a direct child of {type(parent).__name__}")
    return name


def export_config(
    config: PretrainedConfig,
    folder: Path,
    options: PretrainedOptions,
    *,
    drop: tuple[str, ...] = (),
    keep: tuple[str, ...] = (),
    **extra: Any,
) -> dict:
    """Save ``config`` into ``folder`` and return options that rebuild the architecture from there.

    ``drop`` names the sub-configs of the half the component never builds (``text_config``/``vision_config``):
    each is written as its model type and the ``keep`` keys the kept part reads, nothing else, so a reload does not
    carry (or build) the other half; its class defaults fill the rest, on the meta device only."""
    config.save_pretrained(folder)
    if drop:
        from vgt_core.serialization import read_json, write_json

        path = folder / "config.json"
        data = read_json(path)
        for name in drop:
            sub = data.get(name) or {}
            data[name] = {key: sub[key] for key in ("model_type", *keep) if key in sub}
        write_json(path, data)
    update = {"pretrained": ".", "config": None, "load_weights": False, "revision": None, **extra}
    return type(options).model_validate({**options.model_dump(), **update}).model_dump(mode="json")


def is_local(path: str | None) -> bool:
    return path is not None and os.path.isdir(path)
