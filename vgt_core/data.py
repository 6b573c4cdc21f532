"""Training data: image folders, JSONL of {image, caption}, webdataset-style tar shards, or any dataset of
``{"image": PIL.Image, "caption": str}`` items (e.g. the shapes world), with one transform and an exactly
resumable order.

Every source is map-style, so a run can be shuffled from a seed and resumed at the exact batch it stopped at.
Unreadable images are never fatal: an item becomes ``None``, ``collate`` drops it and counts it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------------------------
# Transform
# ---------------------------------------------------------------------------------------------------------------


def to_tensor(image: Image.Image, size: int, *, crop: str = "center", random_flip: bool = False) -> torch.Tensor:
    """RGB, shorter side resized to ``size`` (bicubic, antialiased), cropped square, optionally flipped, in
    [-1, 1]. Random choices draw from torch's global RNG, so a seeded run is reproducible."""
    image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA", "RGBA") else image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC, reducing_gap=None)
    w, h = image.size
    if crop == "random":
        left = int(torch.randint(0, w - size + 1, ()).item())
        top = int(torch.randint(0, h - size + 1, ()).item())
    else:
        left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    x = x.float() / 127.5 - 1
    if random_flip and torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


def _open_image(data: bytes | str | os.PathLike) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        return image
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Sources: each returns {"image": PIL.Image | None, "caption": str} for an index
# ---------------------------------------------------------------------------------------------------------------


class ImageFolder(Dataset):
    """Images under a folder (recursive, sorted); caption from a sibling ``<stem>.txt`` if present."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.paths = sorted(p for p in self.root.rglob("*") if p.is_file() and _is_image(p.name))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        text = path.with_suffix(".txt")
        return {"image": _open_image(path), "caption": text.read_text().strip() if text.exists() else ""}


class JsonlImages(Dataset):
    """Lines of ``{"image": path, "caption": text}``; paths are relative to the JSONL's folder."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.items: list[tuple[Path, str]] = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = row["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}, line {number}: expected a JSON object with an \"image\" key, got {line[:80]!r}") from None
            self.items.append((path.parent / image, str(row.get("caption", ""))))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, caption = self.items[index]
        return {"image": _open_image(image), "caption": caption}


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000..009}.tar`` -> the ten paths (zero padding kept), as webdataset writes them."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for i in range(int(lo), int(hi) + 1) for p in expand_braces(f"{head}{i:0{width}d}{tail}")]


class TarShards(Dataset):
    """Webdataset-style tar shards (``key.jpg`` + ``key.txt``/``key.json``), indexed once so that samples can be
    read in any order: member offsets are recorded and read back by seek."""

    def __init__(self, shards: list[str | os.PathLike]):
        self.shards = [str(s) for s in shards]
        self.samples: list[tuple[int, int, int, str]] = []  # shard, offset, size, caption
        for number, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile():
                        folder, base = os.path.split(member.name)
                        key, _, ext = base.partition(".")
                        groups.setdefault(os.path.join(folder, key), {})[ext.lower()] = member
                for key, members in groups.items():
                    image = next((m for ext, m in members.items() if _is_image("x." + ext)), None)
                    if image is not None:
                        self.samples.append((number, image.offset_data, image.size, self._caption(tar, members)))
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    @staticmethod
    def _caption(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> str:
        if "txt" in members:
            return tar.extractfile(members["txt"]).read().decode("utf-8", "replace").strip()
        if "json" in members:
            try:
                return str(json.loads(tar.extractfile(members["json"]).read()).get("caption", ""))
            except (json.JSONDecodeError, AttributeError):
                return ""
        return ""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if os.getpid() != self._pid:  # a DataLoader worker: never share file handles with the parent
            self._files, self._pid = {}, os.getpid()
        shard, offset, size, caption = self.samples[index]
        f = self._files.get(shard) or self._files.setdefault(shard, open(self.shards[shard], "rb"))
        f.seek(offset)
        return {"image": _open_image(f.read(size)), "caption": caption}


class Transformed(Dataset):
    """Applies the transform to a source; an unreadable image becomes ``None`` (counted by ``collate``)."""

    def __init__(self, source: Dataset, image_size: int, *, random_flip: bool = False, crop: str = "center"):
        self.source, self.image_size, self.random_flip, self.crop = source, image_size, random_flip, crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.source[index]
        if item.get("image") is None:
            return None
        try:
            image = to_tensor(item["image"], self.image_size, crop=self.crop, random_flip=self.random_flip)
        except (OSError, ValueError):
            return None
        return {"image": image, "caption": item.get("caption", ""), "index": index}


def open_dataset(
    source: str | os.PathLike | Dataset, image_size: int, *, random_flip: bool = False, crop: str = "center"
) -> Dataset:
    """A folder of images, a ``.jsonl``, tar shards (a ``.tar``, a brace pattern, or a folder of ``.tar``), or a
    dataset of PIL items -> items ``{"image": (3, S, S) in [-1, 1], "caption", "index"}`` (or None)."""
    if isinstance(source, Dataset):
        raw: Dataset = source
    else:
        text = str(source)
        path = Path(text)
        if "{" in text and text.endswith(".tar"):
            shards = expand_braces(text)
            missing = [s for s in shards if not Path(s).exists()]
            if missing:
                raise FileNotFoundError(f"{text}: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]})")
            raw = TarShards(shards)
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder (expected images, a .jsonl or .tar shards)")
        elif path.suffix == ".jsonl":
            raw = JsonlImages(path)
        elif path.suffix == ".tar":
            raw = TarShards([path])
        elif path.is_dir() and any(path.glob("*.tar")) and not any(_is_image(p.name) for p in path.iterdir()):
            raw = TarShards(sorted(path.glob("*.tar")))
        else:
            raw = ImageFolder(path)
        if len(raw) == 0:
            raise FileNotFoundError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Transformed(raw, image_size, random_flip=random_flip, crop=crop)


# ---------------------------------------------------------------------------------------------------------------
# Batching and order
# ---------------------------------------------------------------------------------------------------------------


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the readable items; ``skipped`` counts the unreadable ones. A batch of only unreadable items has
    zero images (``images`` of shape ``(0,)``)."""
    good = [i for i in items if i is not None]
    return {
        "images": torch.stack([i["image"] for i in good]) if good else torch.zeros(0),
        "captions": [i["caption"] for i in good],
        "indices": [i["index"] for i in good],
        "skipped": len(items) - len(good),
    }


class ResumableSampler(Sampler[list[int]]):
    """Batches of indices for endless epochs, each epoch a permutation seeded by ``seed + epoch``.

    The order is a pure function of (seed, batch number), so a run that consumed ``start`` batches continues
    with exactly the batch an uninterrupted run would take next; training loops pass their step count.
    """

    def __init__(self, length: int, batch_size: int, seed: int = 0, start: int = 0):
        if length < batch_size:
            raise ValueError(f"the dataset has {length} items, fewer than one batch of {batch_size}")
        self.length, self.batch_size, self.seed, self.start = length, batch_size, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = self.length // self.batch_size
        epoch, batch = divmod(self.start, per_epoch)
        while True:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            for b in range(batch, per_epoch):
                yield order[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, batch = epoch + 1, 0

    def __len__(self) -> int:
        return self.length // self.batch_size


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    *,
    start: int = 0,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """An endless loader in a seeded order that skips the ``start`` batches a resumed run already consumed."""
    sampler = ResumableSampler(len(dataset), batch_size, seed, start)
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn or collate, persistent_workers=num_workers > 0
    )
