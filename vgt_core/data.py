"""Training data: image folders, JSONL of {image, caption}, webdataset-style tar shards, or any dataset of
``{"image": PIL.Image, "caption": str}`` items (e.g. a plugin's synthetic world), through one transform, in an
exactly resumable order.

Every source is map-style, so an epoch is a seeded permutation and a killed run resumes at the exact batch it
stopped at. Unreadable images are never fatal: the item becomes ``None`` and ``collate`` drops and counts it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from vgt_core.randomness import sample_generator

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
_LOOKED_FOR = "image files (" + " ".join(IMAGE_EXTENSIONS) + "), a .jsonl list or .tar shards"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# -- transform -------------------------------------------------------------------------------------------------


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(image: Image.Image) -> Image.Image:
    # 16-bit grey (PNG opens as I;16, or I in older Pillow): convert("RGB") clips values above 255 to white;
    # scale by the bit depth instead (65535 -> 255). PIL already reduces 16-bit RGB(A) PNGs to 8 bits per channel.
    if image.mode in _SIXTEEN_BIT or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode in _SIXTEEN_BIT or image.format == "PNG" or values.max(initial=0) > 255:
            values = values / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    # Transparent pixels often hold arbitrary colours; compose them on white rather than expose them.
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def transform_image(
    image: Image.Image,
    size: int,
    *,
    crop: Literal["center", "random"] = "center",
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RGB, shorter side resized to ``size`` (bicubic, antialiased), square crop, optional horizontal flip ->
    (3, size, size) in [-1, 1]. Random choices come from ``generator`` (training gives each sample its own) or
    torch's global RNG, so a seeded run is reproducible."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    image = _to_rgb(image)
    w, h = image.size
    if min(w, h) != size:
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        w, h = image.size
    if crop == "random":
        left, top = (int(torch.randint(0, n - size + 1, (), generator=generator)) for n in (w, h))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    pixels = np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    if random_flip and torch.rand((), generator=generator) < 0.5:
        x = x.flip(-1)
    return x


def _open_image(source: bytes | Path) -> Image.Image | None:
    """Decode fully now, so truncated or non-image data shows up here as ``None`` and not later."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        image.load()
        return image
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None


# -- sources: item -> {"image": PIL.Image | None, "caption": str} ------------------------------------------------


class ImageFolderDataset(Dataset):
    """Images anywhere under ``root`` in sorted order; caption from a sibling ``<stem>.txt`` if present."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.paths = sorted(p for p in self.root.rglob("*") if _is_image(p.name) and p.is_file())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        text = path.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""
        return {"image": _open_image(path), "caption": caption}


class JsonlDataset(Dataset):
    """One ``{"image": path, "caption": text}`` per line; relative paths are relative to the JSONL's folder.
    A malformed line is a configuration error, raised at construction with its line number."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.items: list[tuple[Path, str]] = []
        with self.path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    image = row["image"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(
                        f'{self.path}, line {number}: expected a JSON object with an "image" key, got {line.strip()[:80]!r}'
                    ) from None
                self.items.append((self.path.parent / image, str(row.get("caption") or "")))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, caption = self.items[index]
        return {"image": _open_image(image), "caption": caption}


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000..009}.tar`` -> ten paths, zero padding kept (as webdataset names shards); ``{a,b}`` lists too."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        choices = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


class TarShardDataset(Dataset):
    """Webdataset-style uncompressed tar shards (``key.jpg`` + ``key.txt`` or ``key.json``). Member offsets are
    indexed once; items are read back by seek, so access is random. Each process opens its own file handles.

    A truncated shard (a copy or download cut short) keeps the samples before the cut: the damaged ones are not
    indexed, counted in ``damaged`` and named in a warning. A file that is not a tar at all is an error."""

    def __init__(self, shards: list[str | os.PathLike]):
        self.shards = [str(s) for s in shards]
        # (shard, image offset, image size, caption member as (offset, size, is_json) or None)
        self.samples: list[tuple[int, int, int, tuple[int, int, bool] | None]] = []
        self.damaged = 0  # samples lost to truncated shards
        for number, shard in enumerate(self.shards):
            groups: dict[str, list[tarfile.TarInfo]] = {}
            try:
                tar = tarfile.open(shard, "r:")
            except tarfile.TarError as error:
                raise ValueError(f"{shard}: not a readable uncompressed tar shard ({error})") from None
            truncated = False
            with tar:
                try:
                    for member in tar:
                        if member.isfile():
                            folder, base = os.path.split(member.name)
                            groups.setdefault(os.path.join(folder, base.split(".", 1)[0]), []).append(member)
                except tarfile.TarError:  # the file ends inside a member: keep what came before
                    truncated = True
                last = tar.offset  # where the next header would start
            end = os.path.getsize(shard)
            lost = 0
            with open(shard, "rb") as file:  # a tar ends with zero blocks; anything else there is a cut-off header
                file.seek(last)
                tail = file.read(1 << 16)
            if tail.strip(b"\0") or (not tail and groups):
                truncated = True
                lost += 1 if tail.strip(b"\0") else 0  # at most the one sample whose header was cut
            for members in groups.values():
                whole = [m for m in members if m.offset_data + m.size <= end]
                truncated |= len(whole) < len(members)
                image = next((m for m in whole if _is_image(m.name)), None)
                if image is not None:
                    self.samples.append((number, image.offset_data, image.size, self._caption_member(whole)))
                elif any(_is_image(m.name) for m in members):
                    lost += 1
            if truncated:
                self.damaged += lost
                warnings.warn(f"{shard}: truncated tar shard; {lost} damaged sample(s) skipped, the rest are read", stacklevel=2)
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    @staticmethod
    def _caption_member(members: list[tarfile.TarInfo]) -> tuple[int, int, bool] | None:
        for suffix, is_json in ((".txt", False), (".json", True)):
            member = next((m for m in members if m.name.lower().endswith(suffix)), None)
            if member is not None:
                return member.offset_data, member.size, is_json
        return None

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if os.getpid() != self._pid:  # a forked DataLoader worker must not share the parent's file positions
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = open(self.shards[shard], "rb")
        file = self._files[shard]
        file.seek(offset)
        return file.read(size)

    def _caption(self, member: tuple[int, int, bool] | None, shard: int) -> str:
        if member is None:
            return ""
        offset, size, is_json = member
        text = self._read(shard, offset, size).decode("utf-8", "replace")
        if not is_json:
            return text.strip()
        try:
            return str(json.loads(text).get("caption") or "")
        except (json.JSONDecodeError, AttributeError):
            return ""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, offset, size, caption = self.samples[index]
        return {"image": _open_image(self._read(shard, offset, size)), "caption": self._caption(caption, shard)}

    def __getstate__(self) -> dict[str, Any]:  # file handles do not pickle (spawned workers)
        return {**self.__dict__, "_files": {}}


class TransformedDataset(Dataset):
    """A source through ``transform_image``: items ``{"image", "caption", "index"}``, or ``None`` if unreadable."""

    def __init__(self, source: Dataset, image_size: int, *, random_flip: bool = False, crop: str = "center"):
        self.source, self.image_size, self.random_flip, self.crop = source, image_size, random_flip, crop

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.load(index)

    def load(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any] | None:
        """Item ``index``, its random crop and flip drawn from ``generator`` (the global RNG when None)."""
        item = self.source[index]
        if item is None or item.get("image") is None:
            return None
        try:
            image = transform_image(
                item["image"], self.image_size, crop=self.crop, random_flip=self.random_flip, generator=generator
            )
        except (OSError, ValueError):
            return None
        return {"image": image, "caption": item.get("caption") or "", "index": index}


def _source_for(path: Path) -> Dataset:
    text = str(path)
    if "{" in text:
        shards = expand_braces(text)
        missing = [s for s in shards if not Path(s).is_file()]
        if missing:
            raise FileNotFoundError(f"{text}: {len(missing)} of {len(shards)} shards do not exist (first: {missing[0]})")
        return TarShardDataset(shards)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (expected a folder of {_LOOKED_FOR})")
    if path.is_file():
        if path.suffix.lower() == ".jsonl":
            return JsonlDataset(path)
        if path.suffix.lower() == ".tar":
            return TarShardDataset([path])
        raise ValueError(f"{path}: unsupported data file (expected a folder of {_LOOKED_FOR})")
    folder = ImageFolderDataset(path)
    tars = sorted(path.glob("*.tar"))
    return TarShardDataset(tars) if len(folder) == 0 and tars else folder


@dataclass
class ShardSource:
    """Tar shards read as a stream (``streaming: true``; ``vgt_core.streaming``) rather than indexed: each process
    reads its own shards, decoded in its DataLoader workers, and nothing indexes every shard up front."""

    shards: list[str]
    image_size: int
    crop: Literal["center", "random"] = "center"
    random_flip: bool = False

    def loader(self, per_rank_batch: int, seed: int, rank: int, world: int, num_workers: int, state: dict | None = None):
        from vgt_core.streaming import stream_loader

        return stream_loader(
            self.shards, self.image_size, per_rank_batch=per_rank_batch, seed=seed, rank=rank, world=world,
            num_workers=num_workers, crop=self.crop, random_flip=self.random_flip, start_state=state,
        )  # fmt: skip


def tar_shards(path: str | os.PathLike) -> list[str]:
    """The shards a path names: a ``.tar``, a brace pattern (``data/{000..099}.tar``) or a folder of ``.tar``."""
    text = str(path)
    if "{" in text:
        return expand_braces(text)
    if Path(text).is_dir():
        shards = sorted(str(p) for p in Path(text).glob("*.tar"))
        if shards:
            return shards
    elif text.endswith(".tar"):
        return [text]
    raise ValueError(f"{text}: streaming reads tar shards (a .tar, a brace pattern or a folder of .tar), found none")


def open_dataset(
    source: str | os.PathLike | Dataset,
    image_size: int,
    *,
    random_flip: bool = False,
    crop: Literal["center", "random"] = "center",
    streaming: bool = False,
) -> Dataset | ShardSource:
    """The right source for a path (image folder, ``.jsonl``, ``.tar``, brace pattern or folder of ``.tar``), or
    a dataset of PIL items, all through the same transform; with ``streaming`` a path's tar shards as a
    ``ShardSource``. Raises FileNotFoundError when no images are found."""
    if streaming:
        if not isinstance(source, (str, os.PathLike)):
            raise ValueError("streaming reads tar shards from a path; this data source is a dataset object")
        return ShardSource(tar_shards(source), image_size, crop=crop, random_flip=random_flip)
    raw = open_source(source) if isinstance(source, (str, os.PathLike)) else source
    return TransformedDataset(raw, image_size, random_flip=random_flip, crop=crop)


def open_source(path: str | os.PathLike) -> Dataset:
    """The items of a path (image folder, ``.jsonl``, tar shards) before any transform, for code that splits or
    subsets them (``vgt ablate`` holds images out). Raises FileNotFoundError when no images are found."""
    raw = _source_for(Path(path))
    if len(raw) == 0:
        raise FileNotFoundError(f"{path}: no images found (looked for {_LOOKED_FOR})")
    return raw


def check_trainable(dataset: Dataset | ShardSource, batch_size: int, key: str) -> None:
    """Refuse, before any training, a data set with fewer items than one global batch (``key``: the setting to
    lower) or without a single readable image (a run would otherwise pass over every step and train nothing).
    Items are decoded until the first readable one. A stream (``ShardSource``) is not indexed and not checked."""
    if isinstance(dataset, ShardSource):
        return
    if len(dataset) < batch_size:
        raise ValueError(
            f"the data set has {len(dataset)} items, fewer than one batch of {batch_size}: lower the batch, e.g. "
            f"--set {key}={max(1, len(dataset))}, or add data"
        )
    for index in range(len(dataset)):
        item = dataset[index]
        if item is not None and (not isinstance(item, dict) or item.get("image", True) is not None):
            return
    raise ValueError(f"none of the data set's {len(dataset)} images is readable (every one failed to decode): nothing to train on")


# -- batching and order ----------------------------------------------------------------------------------------


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the readable items, count the unreadable ones in ``skipped``. Always a dict: a batch where every item
    was unreadable has ``images`` with ``shape[0] == 0`` (callers skip it), so ``skipped`` is never lost."""
    good = [item for item in items if item is not None]
    return {
        "images": torch.stack([item["image"] for item in good]) if good else torch.zeros(0),
        "captions": [item["caption"] for item in good],
        "indices": [item["index"] for item in good],
        "positions": [item.get("position", i) for i, item in enumerate(good)],
        "skipped": len(items) - len(good),
    }


class ResumableSampler(Sampler[list[int]]):
    """Batches of indices for endless epochs; epoch ``e`` is the permutation drawn from ``seed + e``.

    ``position`` counts the batches handed out and advances as each batch is yielded, so save ``state_dict()``
    after consuming a batch: a sampler restored from it continues with exactly the batch that would have come next.
    (Through ``make_loader`` it counts batches the loader delivered, not those its workers prefetched.)
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if dataset_len < 1 or (drop_last and dataset_len < batch_size):
            raise ValueError(f"the dataset has {dataset_len} items, fewer than one batch of {batch_size}: lower batch_size")
        self.dataset_len, self.batch_size, self.seed, self.drop_last = dataset_len, batch_size, seed, drop_last
        self.batches_per_epoch = dataset_len // batch_size if drop_last else -(-dataset_len // batch_size)
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        epoch, batch = divmod(self.position, self.batches_per_epoch)
        return {"epoch": epoch, "batch": batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f'expected a sampler state {{"epoch": int, "batch": int}}, got {state!r}') from None
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"sampler state {state} is outside epochs of {self.batches_per_epoch} batches")
        self.position = epoch * self.batches_per_epoch + batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, batch = divmod(self.position, self.batches_per_epoch)
        while True:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + epoch))
            for b in range(batch, self.batches_per_epoch):
                self.position = epoch * self.batches_per_epoch + b + 1
                yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
            epoch, batch = epoch + 1, 0


class SampleKey(NamedTuple):
    """Where a sample sits in training: dataset ``index``, global batch ``step`` (1-based) and ``position`` in it."""

    index: int
    step: int
    position: int


class ShardedSampler(ResumableSampler):
    """This process's share of each global batch of ``ResumableSampler``: positions ``[rank * k, (rank + 1) * k)``
    of the batch, ``k = batch_size / world``, as ``SampleKey``s. The order and the position counter are global, so
    the shares of all processes make up the single-process batch and a run resumes on any number of processes."""

    def __init__(self, dataset_len: int, batch_size: int, seed: int, *, rank: int = 0, world: int = 1):
        super().__init__(dataset_len, batch_size, seed, drop_last=True)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} processes")
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} does not split evenly across {world} processes")
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[list[SampleKey]]:
        share = self.batch_size // self.world
        first = self.rank * share
        for batch in super().__iter__():
            step = self.position  # advanced past this batch: batch number ``position`` counting from 1
            yield [SampleKey(index, step, p) for p, index in enumerate(batch[first : first + share], start=first)]


class KeyedDataset(Dataset):
    """Items by ``SampleKey``: each sample's random transform draws from its own generator, seeded from
    ``(seed, step, position)``, and the item carries its ``position`` (the model's draws use it too)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey) -> dict[str, Any] | None:
        if hasattr(self.dataset, "load"):
            item = self.dataset.load(key.index, sample_generator(self.seed, "data", key.step, key.position))
        else:
            item = self.dataset[key.index]
        return None if item is None else {**item, "position": key.position}


class _DeliveredPositionLoader(DataLoader):
    """Workers pull the sampler ahead of training; reset its position to the batches actually delivered."""

    def __iter__(self) -> Iterator[Any]:
        sampler, start = self.batch_sampler, self.batch_sampler.position
        for delivered, batch in enumerate(super().__iter__(), start=1):
            sampler.position = start + delivered
            yield batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    start_state: dict[str, int] | int | None = None,
    *,
    collate_fn: Callable[[list[Any]], Any] = collate,
    rank: int = 0,
    world: int = 1,
) -> tuple[DataLoader, ResumableSampler]:
    """An endless loader in the seeded order, resumed from ``start_state`` (a sampler ``state_dict()``, or the
    number of global batches already consumed). Save ``sampler.state_dict()`` after consuming a batch to resume
    there. ``batch_size`` is the global batch; process ``rank`` of ``world`` gets its share of each (see
    ``ShardedSampler``), every item with its ``position`` in the global batch."""
    sampler = ShardedSampler(len(dataset), batch_size, seed, rank=rank, world=world)
    if isinstance(start_state, int):
        sampler.position = start_state
    elif start_state is not None:
        sampler.load_state_dict(start_state)
    # The loader's own generator: iter() draws a worker base seed, which must not advance the global RNG that a
    # resumed run restores from its checkpoint (an extra draw there would change every later random number).
    loader = _DeliveredPositionLoader(
        KeyedDataset(dataset, seed), batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed)
    )
    return loader, sampler
