"""Folders of safetensors + JSON, written atomically; nested training state without pickle.

Model folders hold ``config.json`` and ``model.safetensors``. Training checkpoints (optimizer, EMA,
RNG) are nested dicts/lists of tensors and numbers: tensors go to safetensors, the rest to a JSON skeleton,
so that nothing is ever unpickled on load.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vgt_core.errors import VGTError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    A run killed while writing leaves at worst a ``.tmp-*`` folder, never a half-written ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; a damaged one is a ``VGTError`` naming it (a folder whose writing was cut short)."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VGTError(f"{path}: damaged JSON ({exc})") from None


def save_weights(module: torch.nn.Module, path: str | os.PathLike, state: dict[str, torch.Tensor] | None = None) -> None:
    """``module``'s weights (or ``state``, e.g. gathered from a sharded run) as safetensors."""
    state = {k: v.detach().contiguous().cpu() for k, v in (state if state is not None else module.state_dict()).items()}
    save_file(_untie(state), str(path))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights); store each once as its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


class WeightsMismatchError(VGTError, RuntimeError):
    """A weights file whose tensors (names or shapes) are not the model's."""


def load_weights(module: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    try:
        state = load_file(str(path))
    except SafetensorError as exc:
        raise VGTError(f"{path}: damaged safetensors file ({exc})") from None
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ: the folder's config does not describe these weights
        raise WeightsMismatchError(f"{path}: weights do not match the model: {exc}") from None
    if strict and (missing or unexpected):
        raise WeightsMismatchError(
            f"{path}: weights do not match the model: missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )


# ---------------------------------------------------------------------------------------------------------------
# Nested state (optimizer, EMA, RNG, counters) without pickle
# ---------------------------------------------------------------------------------------------------------------


def save_tree(tree: Any, folder: str | os.PathLike, name: str) -> None:
    """Save a nested structure of dicts, lists, tensors and JSON scalars as ``name.safetensors`` + ``name.json``."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = node.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(node, dict):
            return {"__dict__": [[encode(k), encode(v)] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return {"__list__": [encode(v) for v in node], "tuple": isinstance(node, tuple)}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot save {type(node).__name__} in a checkpoint tree")

    skeleton = encode(tree)
    save_file(tensors, str(Path(folder) / f"{name}.safetensors"))
    write_json(Path(folder) / f"{name}.json", skeleton)


def load_tree(folder: str | os.PathLike, name: str) -> Any:
    tensors = load_file(str(Path(folder) / f"{name}.safetensors"))

    def decode(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__dict__" in node:
                return {decode(k): decode(v) for k, v in node["__dict__"]}
            if "__list__" in node:
                items = [decode(v) for v in node["__list__"]]
                return tuple(items) if node.get("tuple") else items
        return node

    return decode(read_json(Path(folder) / f"{name}.json"))


def resolve_relative(options: dict, base: Path, keys: tuple[str, ...] = ("pretrained", "tokenizer")) -> dict:
    """Options exported by a component name sub-folders of the model folder; make them absolute."""
    options = dict(options)
    for key in keys:
        value = options.get(key)
        if isinstance(value, str) and not os.path.isabs(value) and (base / value).exists():
            options[key] = str(base / value)
    return options


def write_model_folder(
    folder: Path, model: torch.nn.Module, config: dict, components: dict[str, torch.nn.Module], state: dict | None = None
) -> None:
    """``config.json`` + ``model.safetensors``; each component whose plugin can ``export`` writes its own offline
    config (and tokenizer...) into ``folder/<role>`` and its spec points there, so the folder reloads without
    the hub or the original paths."""
    for role, module in components.items():
        sub = folder / role
        sub.mkdir(exist_ok=True)
        if hasattr(module, "export"):
            config[role] = {"name": config[role]["name"], "options": module.export(sub)}
    write_json(folder / CONFIG_NAME, config)
    save_weights(model, folder / WEIGHTS_NAME, state)


def read_model_config(folder: Path, fmt: str, what: str, roles: tuple[str, ...]) -> tuple[dict, dict[str, dict]]:
    """A model folder's config (its ``format`` checked) and each component's spec with paths made absolute."""
    config = read_json(folder / CONFIG_NAME)
    if config.get("format") != fmt:
        raise ValueError(f"{folder}: not a {what} folder (format {config.get('format')!r})")
    specs = {
        role: {"name": config[role]["name"], "options": resolve_relative(config[role]["options"], folder / role)}
        for role in roles
    }
    return config, specs
