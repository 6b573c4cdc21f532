"""Pre-computed VGT-AE latents, so that AR training need not run the encoder every step (MAR's trick).

A cache is a folder: ``manifest.json`` and shards ``shard-NNNNN.safetensors`` (latents ``(n, C, h, w)``)
with ``shard-NNNNN.json`` (their captions).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vgt_core.serialization import atomic_folder, write_json

FORMAT = "vgt-latents"


def is_latent_cache(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "manifest.json").exists()


@torch.no_grad()
def cache_latents(
    autoencoder: torch.nn.Module,
    dataset: Dataset,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 32,
    shard_size: int = 4096,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Encode every image of ``dataset`` (eval mode: normalised, no noise) into a latent cache folder.

    ``out_dir`` must be new, empty, or an earlier latent cache holding only its own files, which is then replaced
    as a whole once the new one is complete; any other folder is refused before anything is encoded."""
    from vgt_core.data import collate

    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    shards, latents, captions, skipped, count = [], [], [], 0, 0
    with atomic_folder(out_dir, kind=FORMAT) as tmp:  # an earlier cache there is replaced, nothing else

        def flush() -> None:
            if latents:
                name = f"shard-{len(shards):05d}"
                save_file({"latents": torch.cat(latents).contiguous()}, str(tmp / f"{name}.safetensors"))
                (tmp / f"{name}.json").write_text(json.dumps(captions))
                shards.append(name)
                latents.clear()
                captions.clear()

        for batch in tqdm(loader, desc="caching latents", disable=not progress):
            skipped += batch["skipped"]
            if batch["images"].shape[0] == 0:
                continue
            z = autoencoder.encode(batch["images"].to(device)).float().cpu()
            latents.append(z)
            captions.extend(batch["captions"])
            count += z.shape[0]
            if sum(x.shape[0] for x in latents) >= shard_size:
                flush()
        flush()
        if count == 0:
            raise ValueError("no readable images: nothing to cache")
        manifest = {
            "format": FORMAT,
            "count": count,
            "skipped": skipped,
            "shards": shards,
            "channels": autoencoder.latent_channels,
            "grid": list(autoencoder.grid),
            "latent_norm": autoencoder.latent_norm.kind,
        }
        write_json(tmp / "manifest.json", manifest)
    return manifest


class LatentDataset(Dataset):
    """Items ``{"latents": (C, h, w), "caption": str}`` from a latent cache (held in memory)."""

    def __init__(self, folder: str | os.PathLike):
        folder = Path(folder)
        self.manifest = json.loads((folder / "manifest.json").read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{folder}: not a latent cache")
        self.latents = torch.cat([load_file(str(folder / f"{s}.safetensors"))["latents"] for s in self.manifest["shards"]])
        self.captions = [c for s in self.manifest["shards"] for c in json.loads((folder / f"{s}.json").read_text())]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"latents": self.latents[index], "caption": self.captions[index]}


def collate_latents(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "latents": torch.stack([i["latents"] for i in items]),
        "captions": [i["caption"] for i in items],
        "skipped": 0,
    }
