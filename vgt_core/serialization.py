"""Folders of safetensors + JSON, written atomically; nested training state without pickle; the rules for
output folders; weight files read without running their code.

Model folders hold ``config.json`` and ``model.safetensors``. Training checkpoints (optimizer, EMA,
RNG) are nested dicts/lists of tensors and numbers: tensors go to safetensors, the rest to a JSON skeleton,
so that nothing is ever unpickled on load.

Output folders (``check_output``, ``prepare_output``, ``atomic_folder``): vgt writes only into a new or empty
folder or into one that holds its own earlier output of the same kind, recorded in ``OUT/.vgt-output``; it never
overwrites or removes a file it did not write.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vgt_core.errors import VGTError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# ---------------------------------------------------------------------------------------------------------------
# Output folders: never overwrite or remove what vgt did not write
# ---------------------------------------------------------------------------------------------------------------

OUTPUT_MARKER = ".vgt-output"  # JSON: {"kind": ..., "files": [...]} ("files" for outputs replaced as a whole)
LOCK_NAME = ".vgt-lock"  # held (flock) by the one process writing into the folder
_BOOKKEEPING = {OUTPUT_MARKER, LOCK_NAME}

OutputMode = Literal["new", "reuse", "replace"]

RUN_KIND = "vgt-run"  # a training run's folder (training.run.TrainingRun)

# Folders of a kind written before markers existed, recognised by their layout so that they stay usable.
_UNMARKED = {RUN_KIND: lambda folder: any((folder / "checkpoints").glob("step-*"))}


class OutputFolderError(VGTError):
    """An output path vgt may not write into: it is a file, or a folder of files vgt did not write, or in use."""


@dataclass
class OutputClaim:
    """An output folder a command may write into; holds its lock (``OUT/.vgt-lock``) until ``release``."""

    path: Path
    kind: str
    lock: Any = None  # filelock.FileLock while held

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def output_files(folder: Path) -> list[str]:
    """Every file (and symlink) under ``folder`` as a relative POSIX path, vgt's marker and lock left out."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in files + [d for d in dirs if (base / d).is_symlink()]:
            rel = (base / name).relative_to(folder).as_posix()
            if rel not in _BOOKKEEPING:
                found.append(rel)
    return sorted(found)


def read_output_marker(folder: Path) -> dict[str, Any] | None:
    """The ``OUT/.vgt-output`` record of what vgt wrote there, or None."""
    try:
        data = json.loads((Path(folder) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("kind"), str) else None


def write_output_marker(folder: Path, kind: str, files: list[str] | None = None) -> None:
    """Record that ``folder`` is vgt's output of ``kind`` (and, for outputs replaced as a whole, its files)."""
    write_json(Path(folder) / OUTPUT_MARKER, {"kind": kind, **({"files": files} if files is not None else {})})


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output(path: str | os.PathLike, kind: str | None, mode: OutputMode = "new") -> Path:
    """Raise ``OutputFolderError`` unless ``path`` may receive an output of ``kind``; writes nothing.

    Always allowed: a path that does not exist, or an empty folder. Beyond that, by ``mode``:
    ``new`` nothing else; ``reuse`` a folder holding an earlier output of ``kind`` (the command adds to it, as
    a training run resumed); ``replace`` an earlier output of ``kind`` (any kind when None) every file of which is
    recorded in its marker, so that replacing it as a whole removes only what vgt wrote.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputFolderError(f"{path} is a file, not a folder: give a new or empty folder")
    present = output_files(path) if path.is_dir() else []
    if not present:
        return path
    marker = read_output_marker(path)
    found = marker["kind"] if marker else None
    wanted = kind or "vgt output"
    if found is None and kind in _UNMARKED and _UNMARKED[kind](path):
        found = kind
    if found is None:
        raise OutputFolderError(
            f"{path} is not empty ({_listing(present)}) and is not a {wanted} folder written by vgt: refusing to write "
            "there, vgt never overwrites or removes files it did not write. Give a new or empty folder."
        )
    if kind is not None and found != kind:
        raise OutputFolderError(f"{path} holds a {found} output, not a {kind} one: refusing to write there. Give another folder.")
    if mode == "new":
        raise OutputFolderError(f"{path} already holds a {found} output: give a new or empty folder.")
    if mode == "replace":
        if not marker or not isinstance(marker.get("files"), list):
            raise OutputFolderError(f"{path} holds a {found} output, which vgt adds to but never replaces: give another folder.")
        recorded = set(marker["files"])
        foreign = [name for name in present if name not in recorded]
        if foreign:
            raise OutputFolderError(
                f"{path} holds a {found} output but also files vgt did not write there ({_listing(foreign)}): refusing "
                "to replace it, which would delete them. Move them away or give another folder."
            )
    return path


def prepare_output(path: str | os.PathLike, kind: str, mode: OutputMode = "reuse", *, main_process: bool = True) -> OutputClaim:
    """Check ``path`` (``check_output``), create it, lock it and mark it as an output of ``kind``.

    The lock (``OUT/.vgt-lock``, an flock released when the process ends, even when killed) is held until the
    claim is released: a second command writing into the same folder meanwhile fails at once. On the other
    processes of a multi-process run (``main_process=False``) only the check is made.
    """
    if mode == "replace":
        raise ValueError("prepare_output writes into a folder; outputs replaced as a whole go through atomic_folder")
    path = check_output(path, kind, mode)
    if not main_process:
        return OutputClaim(path, kind)
    from filelock import FileLock, Timeout

    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputFolderError(
            f"{path} is in use by another vgt process (it holds {path / LOCK_NAME}): wait for it to end, or give another folder"
        ) from None
    try:
        check_output(path, kind, mode)  # again, now that no one else can write there
        if read_output_marker(path) is None:
            write_output_marker(path, kind)
    except BaseException:
        lock.release()
        raise
    return OutputClaim(path, kind, lock)


def _written_kind(folder: Path) -> str:
    """The kind of a finished folder whose caller named none: its ``config.json`` format (model folders)."""
    try:
        return str(read_json(folder / CONFIG_NAME).get("format") or "folder")
    except (OSError, ValueError, AttributeError):
        return "folder"


@contextmanager
def atomic_folder(target: str | os.PathLike, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` in one rename.

    A run killed while writing leaves at worst a ``.tmp-*`` folder, never a half-written ``target``. ``target``
    must be new, empty, or an earlier output of ``kind`` holding only files vgt recorded writing
    (``check_output(..., "replace")``, checked before and again after the work); the new folder records its files.
    """
    target = check_output(target, kind, "replace")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        write_output_marker(tmp, kind or _written_kind(tmp), output_files(tmp))
        if target.exists():
            check_output(target, kind, "replace")
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
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder}: not a {what} folder (no {CONFIG_NAME}; vgt's training, conversion and export commands write one)")
    config = read_json(folder / CONFIG_NAME)
    if config.get("format") != fmt:
        raise ValueError(f"{folder}: not a {what} folder (format {config.get('format')!r})")
    specs = {
        role: {"name": config[role]["name"], "options": resolve_relative(config[role]["options"], folder / role)}
        for role in roles
    }
    return config, specs


# ---------------------------------------------------------------------------------------------------------------
# Weight files from elsewhere (torch hub cache, --inception-weights, packaged files): never unpickled
# ---------------------------------------------------------------------------------------------------------------


class UnsafeWeightsError(VGTError):
    """A weights file that cannot be read as tensors without running code from it, or not at all."""


def weights_only_refusal(exc: pickle.UnpicklingError) -> str:
    """Why torch's ``weights_only`` loader refused a file, in a few words (the global it would have to import)."""
    text = str(exc)
    needs = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return f"it needs {needs.group(1)}" if needs else (detail.group(1).strip() if detail else type(exc).__name__)


def load_state_dict_file(path: str | os.PathLike, what: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a torch file read with ``torch.load(weights_only=True)``:
    tensors and plain containers only, so a file that needs code to unpickle is refused and none of it runs.

    Libraries that read such files themselves (torchvision's hub weights, torch-fidelity's Inception) unpickle
    them with ``weights_only=False``; vgt reads them here and hands the libraries the tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise UnsafeWeightsError(f"{what}: {path} cannot be read as safetensors: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeWeightsError(
            f"{what}: {path} refused: it is not a file of tensors only, and unpickling it fully could run code from "
            f"it (torch's weights_only loader: {weights_only_refusal(exc)}). Use a state dict of tensors saved with "
            "torch.save, or a .safetensors file."
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files fail in many ways (struct.error, EOFError...)
        raise UnsafeWeightsError(f"{what}: {path} cannot be read as a torch weights file: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UnsafeWeightsError(f"{what}: {path} is not a state dict (a mapping of names to tensors)")
    return dict(state)
