"""Streaming tar shards: rank/worker split, seeded order, damage counted, exact resume; on real tar files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vgt_core.data import transform_image
from vgt_core.streaming import shard_order, stream_loader

SIZE = 8


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def noise(number: int) -> Image.Image:
    """Random pixels, so that every crop and flip shows."""
    return Image.fromarray(np.random.default_rng(number).integers(0, 256, (8, 12, 3), dtype=np.uint8))


def write_shards(root: Path, sizes: list[int]) -> tuple[list[str], dict[str, Image.Image]]:
    """One tar per size, webdataset naming (``key.png`` + ``key.txt``); each sample random pixels, captioned with
    its number. Returns the shard paths and every key's image."""
    paths, images, number = [], {}, 0
    for s, size in enumerate(sizes):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(size):
                key, image = f"s{s}-{number:04d}", noise(number)
                for ext, data in (("png", png(image)), ("txt", f"sample {number}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                images[key] = image
                number += 1
        paths.append(str(path))
    return paths, images


def one_epoch(loader, epoch: int = 0) -> list[dict]:
    batches = []
    for batch in loader:
        if batch["epoch"] != epoch:
            break
        batches.append(batch)
    return batches


def keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


def test_two_ranks_of_two_workers_cover_every_sample_once_per_epoch(tmp_path):
    shards, originals = write_shards(tmp_path, [3, 2, 4, 1, 3, 2, 5, 2])
    seen = {}
    for rank in (0, 1):
        loader = stream_loader(shards, SIZE, per_rank_batch=2, seed=3, rank=rank, world=2, num_workers=2)
        batches = one_epoch(loader)
        assert all(b["images"].shape[0] <= 2 and b["skipped"] == 0 for b in batches)
        seen[rank] = keys(batches)
        for batch in batches:  # each item went through the map-style transform, with its own caption
            for image, caption, key in zip(batch["images"], batch["captions"], batch["keys"]):
                expected = transform_image(originals[key], SIZE, crop="center", random_flip=False)
                assert torch.equal(image, expected) and caption == f"sample {int(key.split('-')[1])}"
    assert len(seen[0]) == len(set(seen[0])) and len(seen[1]) == len(set(seen[1]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(originals)
    # rank r reads the shards at positions r, r + 2, ... of the epoch's permutation
    order = shard_order(len(shards), 3, 0)
    assert {k.split("-")[0] for k in seen[0]} == {f"s{i}" for i in order[0::2]}


def test_damaged_members_and_a_truncated_shard_are_skipped_and_counted(tmp_path):
    shards, originals = write_shards(tmp_path, [3, 3])
    with tarfile.open(shards[0], "a") as tar:  # a sample whose image is garbage, one with no image at all
        for name, data in (("bad.png", b"not an image at all"), ("bad.txt", b"garbage"), ("lonely.txt", b"no image")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = Path(shards[1]).read_bytes()
    cut = raw.index(b"s1-0004.png")  # the header of the second sample's image: cut the shard inside that member
    Path(shards[1]).write_bytes(raw[: cut + 512 + 20])  # 512: the header; 20 bytes of the PNG

    loader = stream_loader(shards, SIZE, per_rank_batch=4, seed=0, rank=0, world=1, num_workers=2)
    batches = one_epoch(loader)
    got = keys(batches)
    # shard 0: its 3 samples; shard 1: the sample before the cut (the cut one lost its image -> skipped)
    assert sorted(got) == sorted(["s0-0000", "s0-0001", "s0-0002", "s1-0003"])
    skipped = sum(b["skipped"] for b in batches)
    assert skipped == 3  # bad.png, lonely (no image), and the truncated shard
    assert all(torch.equal(i, transform_image(originals[k], SIZE)) for b in batches for i, k in zip(b["images"], b["keys"]))
    assert keys(one_epoch(loader, 1)) != []  # the next epoch runs too: damage is never fatal


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    shards, _ = write_shards(tmp_path, [2] * 8)

    def run(seed: int) -> tuple[list[str], list[str], torch.Tensor]:
        loader = stream_loader(shards, SIZE, per_rank_batch=3, seed=seed, rank=1, world=2, num_workers=0, crop="random", random_flip=True)
        first = one_epoch(loader, 0)
        it = iter(loader)  # continues with epoch 1
        second = [b for b, _ in zip(it, range(2))]
        return keys(first), keys(second), torch.cat([b["images"] for b in first])

    a, a1, pixels = run(seed=0)
    again, again1, pixels_again = run(seed=0)
    b, _, _ = run(seed=1)
    assert a == again and a1 == again1 and torch.equal(pixels, pixels_again)
    assert a != b and a[: len(a1)] != a1
    assert shard_order(8, 0, 0) != shard_order(8, 0, 1) and sorted(shard_order(8, 5, 2)) == list(range(8))


def test_resume_from_a_state_gives_exactly_the_batches_that_came_next(tmp_path):
    """Workers of unequal length (one runs dry first), a batch size that does not divide them, several points."""
    shards, _ = write_shards(tmp_path, [5, 1, 3, 4])
    make = dict(per_rank_batch=2, seed=7, rank=0, world=1, num_workers=2, crop="random", random_flip=True)
    loader = stream_loader(shards, SIZE, **make)
    reference, states = [], []
    for batch in loader:
        reference.append(batch)
        states.append(loader.state_dict())
        if batch["epoch"] == 1:
            break
    assert len(reference) >= 7
    for k in (1, 3, len(reference) - 3, len(reference) - 2):
        resumed = iter(stream_loader(shards, SIZE, **make, start_state=states[k - 1]))
        for want in reference[k:]:
            got = next(resumed)
            assert got["keys"] == want["keys"] and got["epoch"] == want["epoch"]
            assert torch.equal(got["images"], want["images"])


def test_refuses_what_it_cannot_serve(tmp_path):
    shards, _ = write_shards(tmp_path, [2, 2, 2])
    with pytest.raises(ValueError, match=r"3 shards cannot feed 2 ranks x 2 workers.*at least 4"):
        stream_loader(shards, SIZE, per_rank_batch=2, seed=0, rank=0, world=2, num_workers=2)
    with pytest.raises(ValueError, match="rank must be in"):
        stream_loader(shards, SIZE, per_rank_batch=2, seed=0, rank=2, world=2, num_workers=0)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        stream_loader([*shards, str(tmp_path / "nope.tar")], SIZE, per_rank_batch=2, seed=0, rank=0, world=1, num_workers=0)

    loader = stream_loader(shards, SIZE, per_rank_batch=2, seed=0, rank=0, world=1, num_workers=0)
    next(iter(loader))
    mid = loader.state_dict()
    with pytest.raises(ValueError, match=r"cannot resume mid-epoch 0 with world=2.*saved with world=1"):
        stream_loader(shards, SIZE, per_rank_batch=2, seed=0, rank=0, world=2, num_workers=0, start_state=mid)
    with pytest.raises(ValueError, match="seed"):
        stream_loader(shards, SIZE, per_rank_batch=2, seed=1, rank=0, world=1, num_workers=0, start_state=mid)
    boundary = {**mid, "epoch": 2, "consumed": [0]}  # an epoch boundary resumes under another layout
    other = stream_loader(shards, SIZE, per_rank_batch=2, seed=0, rank=1, world=2, num_workers=0, start_state=boundary)
    assert next(iter(other))["epoch"] == 2


def test_iterating_in_process_leaves_the_global_rng_alone(tmp_path):
    shards, _ = write_shards(tmp_path, [3])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = stream_loader(shards, SIZE, per_rank_batch=2, seed=0, rank=0, world=1, num_workers=0, crop="random", random_flip=True)
    one_epoch(loader)
    assert torch.equal(torch.get_rng_state(), before)


def test_vgt_ae_training_streams_shards_and_resumes_exactly(tmp_path):
    """`train_ae.stage1.streaming: true` on tar shards: training reads the stream, and a run resumed from its
    checkpoint ends with the weights of the uninterrupted run."""
    from safetensors.torch import load_file

    from conftest import builtin_preset
    from vgt_core.config import check_preset
    from vgt_core.training.autoencoder import train_autoencoder
    from vgt_core.training.run import log_file

    paths, _ = write_shards(tmp_path, [3, 3, 3, 3])
    p = builtin_preset("tiny-internvl3")
    p["train_ae"]["stage1"].update(batch_size=2, log_every=1, checkpoint_every=3, sample_every=1000, streaming=True,
                                   noise_sigma=0.2, gan_weight=0.0, perceptual_weight=0.0)  # fmt: skip
    preset = check_preset(p, "test", "tiny")
    data = str(tmp_path / "shard-{000..003}.tar")
    straight = train_autoencoder(preset, tmp_path / "straight", data=data, steps=8, progress=False)
    train_autoencoder(preset, tmp_path / "resumed", data=data, steps=3, progress=False)  # stops at its checkpoint
    resumed = train_autoencoder(preset, tmp_path / "resumed", data=data, steps=8, resume=True, progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in log_file(tmp_path / "resumed")] == list(range(1, 9))  # 8 steps: into the third epoch
