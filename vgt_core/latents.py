"""Pre-computed VGT-AE latents, so that AR training need not run the encoder every step (MAR's trick).

A cache is a folder: ``manifest.json`` (``shards`` lists the shard names) and, per shard, ``NAME.safetensors``
(``latents``: ``(n, C, h, w)`` in the manifest's ``dtype``) with ``NAME.json`` (``{"captions": [...], "indices":
[...]}``, the dataset index of each latent; older caches hold a bare list of captions). Written by one process the
shards are ``shard-r000-NNNNN``; by ``world`` processes each rank ``r`` writes ``shard-rRRR-NNNNN`` for the dataset
indices ``i % world == r``. Older single-process caches (``shard-NNNNN``) read the same way.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vgt_core.serialization import atomic_folder, write_json

FORMAT = "vgt-latents"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_latent_cache(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "manifest.json").exists()


def process_state() -> Any:
    """accelerate's ``PartialState`` of this process: one process, or one rank of ``accelerate launch`` /
    ``torchrun``. Without CUDA (or with ``ACCELERATE_USE_CPU=1``) ranks run on the CPU over gloo; accelerate
    itself only goes multi-process on the CPU when asked for the CPU."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def autoencoder_identity(folder: str | os.PathLike) -> str:
    """The sha256 of a VGT-AE folder's ``config.json`` and ``model.safetensors``: which autoencoder made a cache.
    Both files are location-independent (component paths are relative), so a copied folder keeps its identity."""
    from vgt_core.serialization import CONFIG_NAME, WEIGHTS_NAME

    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update(name.encode() + b"\0")
        with open(Path(folder) / name, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_cache_source(manifest: dict, autoencoder_folder: str | os.PathLike, cache: Any) -> None:
    """Latents of another autoencoder are another code: training on them would learn a latent space that the
    pipeline's VGT-AE does not decode. Refuse a cache whose recorded autoencoder differs; warn when a cache made
    before vgt recorded it cannot be checked."""
    recorded = manifest.get("autoencoder_sha256")
    if recorded is None:
        warnings.warn(
            f"{cache}: this latent cache does not record which autoencoder made it (an older vgt wrote it), so it "
            f"cannot be checked against {autoencoder_folder}; re-run `vgt cache-latents` to be sure",
            stacklevel=2,
        )
        return
    actual = autoencoder_identity(autoencoder_folder)
    if recorded != actual:
        made_by = manifest.get("autoencoder") or "another autoencoder"
        raise ValueError(
            f"{cache}: the latents were made by {made_by} (sha256 {recorded[:12]}), not by --autoencoder "
            f"{autoencoder_folder} (sha256 {actual[:12]}): re-run `vgt cache-latents --autoencoder {autoencoder_folder}`, "
            "or pass the autoencoder that made the cache"
        )


def _check_positive(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"cache_latents: {name} must be an integer >= {low}, got {value!r}")


@torch.no_grad()
def cache_latents(
    autoencoder: torch.nn.Module,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    shard_size: int = 4096,
    num_workers: int = 0,
    dtype: str = "float32",
    progress: bool = True,
    source: str | os.PathLike | None = None,
) -> dict:
    """Encode every image of ``dataset`` (eval mode: normalised, no noise) into a latent cache folder.

    Under several processes (``accelerate launch``) each rank encodes the indices ``i % world == rank`` on its own
    device and writes its own shards into one temporary folder; once all are done rank 0 writes the manifest and
    renames the folder into place, so ``out_dir`` appears complete or not at all. Every rank returns the manifest.
    ``dtype`` is how latents are stored (``float32`` or ``bfloat16``, half the size); encoding runs in the
    autoencoder's own precision. ``source``: the autoencoder's folder, recorded (its path and
    ``autoencoder_identity``) so that ``train-ar`` can refuse the cache with another autoencoder. ``out_dir`` must be new, empty, or an earlier latent cache
    holding only its own files, which is then replaced as a whole once the new one is complete; any other folder
    is refused before anything is encoded."""
    from accelerate.utils import broadcast_object_list, gather_object

    from vgt_core.data import collate

    if dtype not in DTYPES:
        raise ValueError(f"cache_latents: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    _check_positive("batch_size", batch_size, 1)
    _check_positive("shard_size", shard_size, 1)
    _check_positive("num_workers", num_workers, 0)
    state = process_state()
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    identity = autoencoder_identity(source) if source is not None and main else None
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    mine = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    with atomic_folder(out_dir, kind=FORMAT) if main else nullcontext() as main_tmp:
        tmp = Path(broadcast_object_list([str(main_tmp) if main else None])[0])  # rank 0's folder, shared by all
        shards, latents, captions, indices, skipped, count = [], [], [], [], 0, 0

        def flush() -> None:
            if latents:
                name = f"shard-r{rank:03d}-{len(shards):05d}"
                save_file({"latents": torch.cat(latents).contiguous()}, str(tmp / f"{name}.safetensors"))
                write_json(tmp / f"{name}.json", {"captions": captions, "indices": indices})
                shards.append(name)
                latents.clear()
                captions.clear()
                indices.clear()

        for batch in tqdm(loader, desc=f"caching latents ({world} processes)", disable=not (progress and main)):
            skipped += batch["skipped"]
            if batch["images"].shape[0] == 0:
                continue
            z = autoencoder.encode(batch["images"].to(device)).to(DTYPES[dtype]).cpu()
            latents.append(z)
            captions.extend(batch["captions"])
            indices.extend(int(i) for i in batch["indices"])
            count += z.shape[0]
            if sum(x.shape[0] for x in latents) >= shard_size:
                flush()
        flush()
        ranks = sorted(gather_object([{"rank": rank, "shards": shards, "count": count, "skipped": skipped}]), key=lambda r: r["rank"])
        total = sum(r["count"] for r in ranks)
        if total == 0:
            raise ValueError("no readable images: nothing to cache")
        manifest = {
            "format": FORMAT,
            "count": total,
            "skipped": sum(r["skipped"] for r in ranks),
            "shards": [name for r in ranks for name in r["shards"]],
            "dtype": dtype,
            "processes": world,
            "channels": autoencoder.latent_channels,
            "grid": list(autoencoder.grid),
            "latent_norm": autoencoder.latent_norm.kind,
            **({"autoencoder": str(source), "autoencoder_sha256": identity} if source is not None else {}),
        }
        if main:
            write_json(tmp / "manifest.json", manifest)
        state.wait_for_everyone()  # every shard is written before rank 0 renames the folder
    state.wait_for_everyone()  # and no rank returns before the folder is in place
    return manifest


class LatentDataset(Dataset):
    """Items ``{"latents": (C, h, w), "caption": str}`` read lazily from a latent cache's safetensors shards.

    Only captions are held in memory; a latent is read (memory-mapped, ``get_slice``) when asked for, so RAM does
    not grow with the cache. File handles belong to one process: a DataLoader worker opens its own.
    ``dtype``: what items are returned as (``None``: as stored)."""

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype | None = torch.float32):
        self.folder, self.dtype = Path(folder), dtype
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.folder}: not a latent cache")
        self.files = [str(self.folder / f"{name}.safetensors") for name in self.manifest["shards"]]
        self.captions: list[str] = []
        self.indices: list[int] | None = []  # dataset index of each latent; None for caches that did not store it
        self.starts: list[int] = []  # first item of each shard
        for name, file in zip(self.manifest["shards"], self.files):
            with safe_open(file, framework="pt") as handle:
                rows = handle.get_slice("latents").get_shape()[0]
            meta = json.loads((self.folder / f"{name}.json").read_text())
            captions = meta if isinstance(meta, list) else meta["captions"]
            if len(captions) != rows:
                raise ValueError(f"{self.folder}: shard {name} holds {rows} latents but {len(captions)} captions")
            self.starts.append(len(self.captions))
            self.captions.extend(captions)
            if self.indices is not None and isinstance(meta, dict) and "indices" in meta:
                self.indices.extend(int(i) for i in meta["indices"])
            else:
                self.indices = None
        if len(self.captions) != self.manifest["count"]:
            raise ValueError(f"{self.folder}: the manifest counts {self.manifest['count']} latents, the shards hold {len(self.captions)}")
        self._slices: dict[int, Any] = {}
        self._pid = os.getpid()

    def _slice(self, shard: int) -> Any:
        if os.getpid() != self._pid:  # a forked worker: the parent's handles are not ours
            self._slices, self._pid = {}, os.getpid()
        if shard not in self._slices:
            handle = safe_open(self.files[shard], framework="pt")
            self._slices[shard] = (handle, handle.get_slice("latents"))  # the handle keeps the mapping alive
        return self._slices[shard][1]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"latent {index} out of range for a cache of {len(self)}")
        shard = bisect.bisect_right(self.starts, index) - 1
        latents = self._slice(shard)[index - self.starts[shard]]
        return {"latents": latents if self.dtype is None else latents.to(self.dtype), "caption": self.captions[index]}

    def __getstate__(self) -> dict[str, Any]:  # handles do not pickle (spawned workers) and must not be shared
        return {**self.__dict__, "_slices": {}}


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latents": torch.stack([i["latents"] for i in items]),
        "captions": [i["caption"] for i in items],
        "positions": [i.get("position", n) for n, i in enumerate(items)],
        "skipped": 0,
    }
