"""Data sources, transform, corrupt-item handling and the resumable order, on small real files."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from vgt_core.data import (
    ResumableSampler,
    collate,
    expand_braces,
    make_loader,
    open_dataset,
    transform_image,
)

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (12, 8)) -> Image.Image:
    return Image.new("RGB", size, colour)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def mean_colour(x: torch.Tensor) -> tuple[int, ...]:
    """Back from [-1, 1] to the 0..255 colour of a solid image."""
    return tuple(int(round(v)) for v in ((x.mean((1, 2)) + 1) * 127.5).tolist())


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def captions_by_colour(dataset: Dataset) -> dict[tuple[int, ...], str]:
    return {mean_colour(item["image"]): item["caption"] for item in (dataset[i] for i in range(len(dataset)))}


# -- sources ---------------------------------------------------------------------------------------------------


def test_folder_is_recursive_sorted_and_reads_sibling_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    solid(COLOURS[0]).save(tmp_path / "b.PNG")
    (tmp_path / "b.txt").write_text("a red thing\n")
    solid(COLOURS[1]).save(tmp_path / "a.jpg", quality=100)
    solid(COLOURS[2]).save(tmp_path / "sub" / "c.webp", lossless=True)
    (tmp_path / "notes.md").write_text("not an image")

    dataset = open_dataset(tmp_path, 8)
    assert len(dataset) == 3
    assert [dataset[i]["caption"] for i in range(3)] == ["", "a red thing", ""]  # a.jpg, b.PNG, sub/c.webp
    assert mean_colour(dataset[1]["image"]) == COLOURS[0]
    assert mean_colour(dataset[2]["image"]) == COLOURS[2]


def test_jsonl_relative_and_absolute_paths(tmp_path):
    (tmp_path / "img").mkdir()
    solid(COLOURS[0]).save(tmp_path / "img" / "r.png")
    solid(COLOURS[1]).save(tmp_path / "g.png")
    lines = [{"image": "img/r.png", "caption": "red"}, {"image": str(tmp_path / "g.png")}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")

    assert captions_by_colour(open_dataset(tmp_path / "data.jsonl", 8)) == {COLOURS[0]: "red", COLOURS[1]: ""}


@pytest.mark.parametrize("line", ["{not json", '{"caption": "no image key"}', "[1, 2]"])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "x.png"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"data\.jsonl, line 2"):
        open_dataset(path, 8)


def test_tar_shards_group_by_key_and_read_txt_or_json_captions(tmp_path):
    write_tar(
        tmp_path / "one.tar",
        {
            "dir/s0": {"jpg": encoded(solid(COLOURS[0]), "PNG"), "txt": b"red square"},  # content sniffed, not ext
            "dir/s1": {"json": json.dumps({"caption": "green"}).encode(), "png": encoded(solid(COLOURS[1]))},
            "dir/s2": {"png": encoded(solid(COLOURS[2]))},
            "other/s0": {"png": encoded(solid(COLOURS[3])), "txt": b"same key, other folder"},
            "nolabel": {"txt": b"caption without an image is ignored"},
        },
    )
    dataset = open_dataset(tmp_path / "one.tar", 8)
    assert captions_by_colour(dataset) == {
        COLOURS[0]: "red square",
        COLOURS[1]: "green",
        COLOURS[2]: "",
        COLOURS[3]: "same key, other folder",
    }
    # random access order is free: reading backwards gives the same items
    assert [dataset[i]["caption"] for i in reversed(range(4))] == [dataset[i]["caption"] for i in range(4)][::-1]


def test_brace_pattern_and_folder_of_shards(tmp_path):
    (tmp_path / "shards").mkdir()
    for n in range(3):
        write_tar(tmp_path / "shards" / f"{n:06d}.tar", {f"k{n}": {"png": encoded(solid(COLOURS[n])), "txt": f"c{n}".encode()}})
    assert expand_braces("s/{000008..000010}.tar") == ["s/000008.tar", "s/000009.tar", "s/000010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]

    pattern = open_dataset(tmp_path / "shards" / "{000000..000002}.tar", 8)
    assert [pattern[i]["caption"] for i in range(len(pattern))] == ["c0", "c1", "c2"]
    folder = open_dataset(tmp_path / "shards", 8)
    assert captions_by_colour(folder) == captions_by_colour(pattern)
    with pytest.raises(FileNotFoundError, match="000003.tar"):
        open_dataset(tmp_path / "shards" / "{000000..000003}.tar", 8)


def test_tar_handles_are_reopened_in_a_new_process(tmp_path, monkeypatch):
    import vgt_core.data as data

    shards = open_dataset(write_tar(tmp_path / "s.tar", {"k": {"png": encoded(solid(COLOURS[4]))}}), 8).source
    assert shards[0]["image"].convert("RGB").getpixel((0, 0)) == COLOURS[4]
    parent = shards._files[0]
    monkeypatch.setattr(data.os, "getpid", lambda: -1)  # as seen from a forked worker
    assert shards[0]["image"].convert("RGB").getpixel((0, 0)) == COLOURS[4]
    assert shards._files[0] is not parent and not shards._files[0].closed


class PilItems(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        return {"image": solid(COLOURS[index], (20, 20)), "caption": f"shape {index}"}


def test_wraps_a_dataset_of_pil_items():
    dataset = open_dataset(PilItems(), 16)
    item = dataset[1]
    assert item["image"].shape == (3, 16, 16) and item["caption"] == "shape 1" and item["index"] == 1
    assert mean_colour(item["image"]) == COLOURS[1]


def test_missing_and_empty_sources_say_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.*no such file"):
        open_dataset(tmp_path / "nowhere", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"empty: no images found \(looked for image files.*\.png"):
        open_dataset(tmp_path / "empty", 8)


# -- corrupt data ----------------------------------------------------------------------------------------------


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    solid(COLOURS[0]).save(tmp_path / "a_good.png")
    (tmp_path / "b_noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    jpeg = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    (tmp_path / "c_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    solid(COLOURS[1]).save(tmp_path / "d_good.png")

    dataset = open_dataset(tmp_path, 8)
    assert [dataset[i] is None for i in range(4)] == [False, True, True, False]
    batch = collate([dataset[i] for i in range(4)])
    assert batch["images"].shape == (2, 3, 8, 8)
    assert batch["skipped"] == 2 and batch["indices"] == [0, 3] and batch["captions"] == ["", ""]

    all_bad = collate([dataset[1], dataset[2]])
    assert all_bad["images"].shape[0] == 0 and all_bad["skipped"] == 2 and all_bad["indices"] == []


# -- transform -------------------------------------------------------------------------------------------------


def test_transform_shape_range_and_modes():
    halves = np.zeros((32, 32), dtype=np.uint8)
    halves[:, 16:] = 255
    x = transform_image(Image.fromarray(halves), 16)  # greyscale: black | white
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    transparent = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert torch.allclose(transform_image(transparent, 4), torch.ones(3, 4, 4))  # composed on white
    palette = solid(COLOURS[2]).convert("P")
    assert mean_colour(transform_image(palette, 4)) == COLOURS[2]


def test_center_crop_keeps_the_middle_and_random_crop_is_seeded():
    strip = np.zeros((10, 30, 3), dtype=np.uint8)
    strip[:, 10:20] = 255  # white middle third of a 30x10 image
    image = Image.fromarray(strip)
    assert torch.equal(transform_image(image, 10), torch.ones(3, 10, 10))

    def crops(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return [transform_image(image, 10, crop="random") for _ in range(8)]

    first, again = crops(0), crops(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({tuple(c[0, 0].tolist()) for c in first}) > 1  # different windows were taken


def test_random_flip_is_a_mirror():
    pixels = np.random.default_rng(2).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    plain = transform_image(image, 8)
    assert not torch.equal(plain, plain.flip(-1))
    torch.manual_seed(0)
    outputs = [transform_image(image, 8, random_flip=True) for _ in range(20)]
    flipped = [torch.equal(x, plain.flip(-1)) for x in outputs]
    assert all(f or torch.equal(x, plain) for f, x in zip(flipped, outputs))
    assert 0 < sum(flipped) < len(flipped)


# -- order -----------------------------------------------------------------------------------------------------


def take(sampler: ResumableSampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


def test_sampler_is_a_seeded_permutation_per_epoch():
    a, b = take(ResumableSampler(10, 3, seed=7), 6), take(ResumableSampler(10, 3, seed=7), 6)
    assert a == b
    assert a != take(ResumableSampler(10, 3, seed=8), 6)
    epoch0, epoch1 = sum(a[:3], []), sum(a[3:], [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # no repeats within an epoch
    assert epoch0 != epoch1  # each epoch is its own permutation
    assert [len(batch) for batch in take(ResumableSampler(10, 3, seed=7, drop_last=False), 5)] == [3, 3, 3, 1, 3]


@pytest.mark.parametrize("consumed", [2, 3, 5])  # mid-epoch, exactly at the boundary, inside the second epoch
def test_sampler_resumes_exactly(consumed):
    uninterrupted = take(ResumableSampler(10, 3, seed=1), 9)
    first = ResumableSampler(10, 3, seed=1)
    assert take(first, consumed) == uninterrupted[:consumed]
    state = first.state_dict()
    assert state == {"epoch": consumed // 3, "batch": consumed % 3}
    restored = ResumableSampler(10, 3, seed=1)
    restored.load_state_dict(state)
    assert take(restored, 9 - consumed) == uninterrupted[consumed:]


def test_sampler_rejects_impossible_sizes_and_states():
    with pytest.raises(ValueError, match="4 items, fewer than one batch of 8"):
        ResumableSampler(4, 8, seed=0)
    with pytest.raises(ValueError, match="outside epochs of 3 batches"):
        ResumableSampler(10, 3, seed=0).load_state_dict({"epoch": 0, "batch": 3})


def test_loader_with_workers_matches_single_process_and_resumes(tmp_path):
    samples = {f"k{n:02d}": {"png": encoded(solid(COLOURS[n % 6], (8 + n, 8))), "txt": f"c{n}".encode()} for n in range(12)}
    write_tar(tmp_path / "000000.tar", dict(list(samples.items())[:6]))
    write_tar(tmp_path / "000001.tar", dict(list(samples.items())[6:]))
    dataset = open_dataset(tmp_path / "{000000..000001}.tar", 8)
    assert dataset[0] is not None  # the parent now holds open handles that the forked workers must not share

    def batches(num_workers: int, n: int, start_state=None):
        loader, sampler = make_loader(dataset, 4, seed=3, num_workers=num_workers, start_state=start_state)
        it = iter(loader)
        out = [next(it) for _ in range(n)]
        return out, sampler.state_dict()

    single, _ = batches(0, 5)
    multi, state = batches(2, 2)
    assert state == {"epoch": 0, "batch": 2}  # delivered batches, not those the workers prefetched
    resumed, _ = batches(2, 3, start_state=state)
    for a, b in zip(single, multi + resumed):
        assert a["indices"] == b["indices"] and a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])
    assert sorted(sum((b["indices"] for b in single[:3]), [])) == list(range(12))  # one epoch covers every sample


def test_iterating_a_loader_leaves_the_global_rng_alone():
    """A resumed run restores the global RNG from its checkpoint; a loader that drew from it on iter() would
    shift every later random number (noise, flips), and the resumed run would drift from the uninterrupted one."""
    loader, _ = make_loader(open_dataset(PilItems(), 16), 2, seed=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected)
