"""Streaming webdataset tar shards for training at scale: no index of every member, sequential reads, each rank
and each DataLoader worker reading its own shards.

Order. Epoch ``e`` visits the shards in a permutation seeded by ``(seed, e)``; shard ``i`` of that order belongs to
rank ``i % world``, and the ``j``-th shard of a rank to its (logical) worker ``j % num_workers``. A worker reads its
shards in that order, whole, with webdataset's ``tarfile_to_samples``, decodes and transforms each sample itself
and cuts its samples into batches of ``per_rank_batch``. Random crops and flips draw from a generator seeded by
``(seed, epoch, shard, key)``, so the pixels of a sample depend neither on the worker layout nor on a resume.

Damage is never fatal: a sample whose image is missing or undecodable is a ``None`` item, a tar member or shard
that webdataset cannot read is counted by the handler; both end up in the batch's ``skipped``.

Resume. A batch says which worker made it and how many samples that worker had consumed; the loader keeps these
counts for the batches it delivered. ``state_dict()`` (after consuming a batch) restores the exact next batch:
each worker skips, without decoding, the samples it had consumed, and the worker that was due next comes first.
Mid-epoch this needs the same shards, seed, world size, rank, ``num_workers`` and ``per_rank_batch``; at an
epoch boundary only the shards and the seed must match.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vgt_core.data import _open_image, transform_image
from vgt_core.randomness import sample_generator

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")  # webdataset lower-cases the extension


def shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of shard indices; a pure function of ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n_shards).tolist()


def worker_shards(n_shards: int, seed: int, epoch: int, rank: int, world: int, worker: int, num_workers: int) -> list[int]:
    """The shards (indices into the shard list) that ``worker`` of ``rank`` reads in epoch ``epoch``, in order."""
    return shard_order(n_shards, seed, epoch)[rank::world][worker::num_workers]


class _DamageCounter:
    """A webdataset handler: log the exception, carry on with the next member or shard, and count damaged
    stretches: errors with no sample read between them count once (a truncated shard raises for its last member
    and again for its stream, one stretch)."""

    def __init__(self) -> None:
        self.count, self.in_stretch = 0, False

    def __call__(self, exn: BaseException) -> bool:
        self.count += not self.in_stretch
        self.in_stretch = True
        logger.warning("skipping damaged tar data: %r", exn)
        return True


def _caption(sample: dict[str, Any]) -> str:
    if isinstance(sample.get("txt"), bytes):
        return sample["txt"].decode("utf-8", "replace").strip()
    if isinstance(sample.get("json"), bytes):
        try:
            return str(json.loads(sample["json"]).get("caption") or "")
        except (ValueError, AttributeError):  # not JSON, or not an object
            return ""
    return ""


def _shard_fingerprint(shards: list[str]) -> str:
    """Names (not folders) of the shards in order: moving the data keeps a resumable state valid, renaming not."""
    return hashlib.sha1("\n".join(os.path.basename(s) for s in shards).encode()).hexdigest()[:16]


def collate_stream(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Like ``vgt_core.data.collate``: readable items stacked, ``None`` ones counted in ``skipped``; ``keys`` in
    place of ``indices``. A batch with nothing readable has ``images.shape[0] == 0``."""
    good = [item for item in items if item is not None]
    return {
        "images": torch.stack([item["image"] for item in good]) if good else torch.zeros(0),
        "captions": [item["caption"] for item in good],
        "keys": [item["key"] for item in good],
        "skipped": len(items) - len(good),
    }


class ShardStream(IterableDataset):
    """One rank's samples of one epoch, split over DataLoader workers; yields whole batches (see the module doc).

    ``configure`` sets the epoch and the resume point before each ``DataLoader`` iteration; workers receive a
    fresh copy of the dataset at each iteration, so they see it."""

    def __init__(
        self,
        shards: list[str],
        image_size: int,
        *,
        per_rank_batch: int,
        seed: int,
        rank: int,
        world: int,
        num_workers: int,
        crop: Literal["center", "random"] = "center",
        random_flip: bool = False,
    ):
        self.shards, self.image_size, self.per_rank_batch, self.seed = shards, image_size, per_rank_batch, seed
        self.rank, self.world, self.logical_workers = rank, world, max(num_workers, 1)
        self.crop, self.random_flip = crop, random_flip
        self.epoch, self.consumed, self.rotation = 0, [0] * self.logical_workers, 0

    def configure(self, epoch: int, consumed: list[int], rotation: int) -> None:
        self.epoch, self.consumed, self.rotation = epoch, list(consumed), rotation

    def item(self, sample: dict[str, Any], shard: int) -> dict[str, Any] | None:
        """A raw webdataset sample -> ``{"image", "caption", "key"}``, or ``None`` if its image is missing or bad."""
        key = str(sample.get("__key__", ""))
        data = next((sample[k] for k in IMAGE_KEYS if isinstance(sample.get(k), bytes)), None)
        image = _open_image(data) if data is not None else None
        if image is None:
            return None
        # the sample's own generator: its crop and flip are the same in any worker, and the caller's RNG is left alone
        generator = sample_generator(self.seed, "stream", self.epoch, f"{shard}/{key}")
        try:
            pixels = transform_image(image, self.image_size, crop=self.crop, random_flip=self.random_flip, generator=generator)
        except (OSError, ValueError):
            return None
        return {"image": pixels, "caption": _caption(sample), "key": key}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, running = (info.id, info.num_workers) if info is not None else (0, 1)
        if running != self.logical_workers:
            raise RuntimeError(f"ShardStream was built for {self.logical_workers} worker(s) but runs under {running}")
        worker = (physical + self.rotation) % self.logical_workers
        order = [self.shards[i] for i in shard_order(len(self.shards), self.seed, self.epoch)]
        shard_index = {url: i for i, url in enumerate(self.shards)}
        damaged = _DamageCounter()
        # webdataset's pieces: the epoch's shard list, split by rank then by worker (explicitly, as
        # wds.split_by_node / split_by_worker would from the environment), read as a tar stream, members grouped
        # by key; the handler counts and skips damage. Equals worker_shards(...).
        samples = iter(
            wds.DataPipeline(
                wds.SimpleShardList(order),
                lambda src: islice(src, self.rank, None, self.world),
                lambda src: islice(src, worker, None, self.logical_workers),
                wds.tarfile_to_samples(handler=damaged),
            )
        )
        consumed = self.consumed[worker]
        for _ in islice(samples, consumed):  # resume: skip what was consumed, reading but not decoding
            pass
        damaged.count, damaged.in_stretch = 0, False  # damage met while skipping was counted before the checkpoint
        items: list[dict[str, Any] | None] = []
        reported = 0

        def batch() -> dict[str, Any]:
            nonlocal reported
            out = collate_stream(items)
            out["skipped"] += damaged.count - reported
            reported = damaged.count
            out.update(epoch=self.epoch, _worker=worker, _consumed=consumed)
            items.clear()
            return out

        for sample in samples:
            damaged.in_stretch = False
            items.append(self.item(sample, shard_index.get(sample.get("__url__"), -1)))
            consumed += 1
            if len(items) == self.per_rank_batch:
                yield batch()
        if items or damaged.count > reported:
            yield batch()


class StreamLoader:
    """Endless batches of one rank, epoch after epoch; ``state_dict()`` after a batch is the point to resume at.

    Batches: ``{"images": (n, 3, S, S) in [-1, 1], "captions": [str] * n, "keys": [str] * n, "skipped": int,
    "epoch": int}``; ``n <= per_rank_batch`` (skipped samples, and each worker's last batch of an epoch, are short).
    """

    def __init__(self, dataset: ShardStream, num_workers: int, state: dict[str, Any]):
        self.dataset, self.num_workers = dataset, num_workers
        self.epoch, self.consumed, self.rotation = state["epoch"], list(state["consumed"]), state["next_worker"]

    def state_dict(self) -> dict[str, Any]:
        d = self.dataset
        return {
            "epoch": self.epoch,
            "consumed": list(self.consumed),
            "next_worker": self.rotation,
            "rank": d.rank,
            "world": d.world,
            "num_workers": d.logical_workers,
            "per_rank_batch": d.per_rank_batch,
            "seed": d.seed,
            "shards": _shard_fingerprint(d.shards),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        workers = self.dataset.logical_workers
        while True:
            self.dataset.configure(self.epoch, self.consumed, self.rotation)
            # Its own generator: iter() draws worker base seeds, which must not advance the global RNG.
            loader = DataLoader(
                self.dataset, batch_size=None, num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.dataset.seed)
            )
            fresh, readable = not any(self.consumed), 0
            for batch in loader:
                worker = batch.pop("_worker")
                self.consumed[worker] = batch.pop("_consumed")
                self.rotation = (worker + 1) % workers  # the DataLoader serves its workers round-robin
                readable += batch["images"].shape[0]
                yield batch
            if fresh and readable == 0:
                raise RuntimeError(
                    f"rank {self.dataset.rank}: epoch {self.epoch} of its shards held no readable sample; check the shards"
                )
            self.epoch, self.consumed, self.rotation = self.epoch + 1, [0] * workers, 0


def _is_local(path: str) -> bool:
    return "://" not in path and not path.startswith("pipe:")


def stream_loader(
    shards: list[str | os.PathLike],
    image_size: int,
    *,
    per_rank_batch: int,
    seed: int,
    rank: int,
    world: int,
    num_workers: int,
    crop: Literal["center", "random"] = "center",
    random_flip: bool = False,
    start_epoch: int = 0,
    start_state: dict[str, Any] | None = None,
) -> StreamLoader:
    """This rank's endless stream of batches from webdataset tar shards (``key.jpg`` + ``key.txt``/``key.json``).

    Start at the beginning of ``start_epoch``, or exactly after the batch whose ``loader.state_dict()`` is
    ``start_state`` (each rank saves and restores its own state). Raises ValueError on a layout that cannot be
    served: fewer shards than ``world * max(num_workers, 1)`` (a worker would get nothing), or a state that does not
    belong to this stream."""
    paths = [str(s) for s in shards]
    if not paths:
        raise ValueError("stream_loader: no shards given")
    if len(set(paths)) != len(paths):
        raise ValueError("stream_loader: a shard is listed twice (its samples would be seen twice per epoch)")
    missing = [p for p in paths if _is_local(p) and not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} shards do not exist (first: {missing[0]})")
    limits = {"image_size": (image_size, 1), "per_rank_batch": (per_rank_batch, 1), "world": (world, 1)}
    for name, (value, low) in {**limits, "num_workers": (num_workers, 0), "start_epoch": (start_epoch, 0)}.items():
        if not isinstance(value, int) or value < low:
            raise ValueError(f"stream_loader: {name} must be an integer >= {low}, got {value!r}")
    if not 0 <= rank < world:
        raise ValueError(f"stream_loader: rank must be in [0, {world}), got {rank!r}")
    if crop not in ("center", "random"):
        raise ValueError(f"stream_loader: crop must be 'center' or 'random', got {crop!r}")
    readers = world * max(num_workers, 1)
    if len(paths) < readers:
        raise ValueError(
            f"{len(paths)} shards cannot feed {world} ranks x {max(num_workers, 1)} workers: every worker reads whole "
            f"shards, so at least {readers} are needed; lower num_workers or split the data into more shards"
        )
    dataset = ShardStream(
        paths, image_size, per_rank_batch=per_rank_batch, seed=seed, rank=rank, world=world,
        num_workers=num_workers, crop=crop, random_flip=random_flip,
    )  # fmt: skip
    workers = dataset.logical_workers
    state = {"epoch": start_epoch, "consumed": [0] * workers, "next_worker": 0}
    if start_state is not None:
        if start_epoch:
            raise ValueError("stream_loader: pass start_epoch or start_state, not both")
        state = _check_state(start_state, StreamLoader(dataset, num_workers, state).state_dict())
    return StreamLoader(dataset, num_workers, state)


def _check_state(state: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    """``state`` if this stream can resume from it, else a ValueError saying what differs."""
    try:
        epoch, consumed, next_worker = int(state["epoch"]), [int(c) for c in state["consumed"]], int(state["next_worker"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"expected a stream state from StreamLoader.state_dict(), got {state!r}") from None
    for key in ("seed", "shards"):
        if state.get(key) != mine[key]:
            raise ValueError(f"stream state is of another stream: {key} {state.get(key)!r}, this stream has {mine[key]!r}")
    if epoch < 0 or any(c < 0 for c in consumed):
        raise ValueError(f"stream state has a negative position: {state!r}")
    if not any(consumed):  # an epoch boundary: any layout starts it afresh
        return {"epoch": epoch, "consumed": [0] * mine["num_workers"], "next_worker": 0}
    for key in ("world", "rank", "num_workers", "per_rank_batch"):
        if state.get(key) != mine[key]:
            raise ValueError(
                f"cannot resume mid-epoch {epoch} with {key}={mine[key]!r}: the state was saved with {key}={state.get(key)!r}. "
                f"Resume with the same world size, rank, num_workers and per_rank_batch, or from an epoch boundary"
            )
    if len(consumed) != mine["num_workers"] or not 0 <= next_worker < mine["num_workers"]:
        raise ValueError(f"stream state does not match {mine['num_workers']} workers: {state!r}")
    return {"epoch": epoch, "consumed": consumed, "next_worker": next_worker}
