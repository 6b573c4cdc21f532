"""The latent cache: bf16 or fp32 shards, lazy memory-mapped reads, and a 2-process `accelerate launch` cache equal
to the 1-process one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, builtin_preset
from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.data import open_dataset
from vgt_core.latents import LatentDataset, cache_latents


@pytest.fixture(scope="module")
def ae_and_images(tmp_path_factory):
    """A tiny VGT-AE saved as a folder, and a folder of 11 captioned images (one of them unreadable)."""
    root = tmp_path_factory.mktemp("latents")
    preset = builtin_preset("tiny-internvl3")
    torch.manual_seed(0)
    ae = VGTAutoencoder.from_specs(preset["encoder"], preset["decoder"]).eval()
    ae.save_pretrained(root / "ae")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(f"picture number {i}")
    (images / "99.png").write_bytes(b"not an image")
    return ae, root / "ae", images


def by_index(cache: LatentDataset) -> dict[int, tuple[str, torch.Tensor]]:
    assert cache.indices is not None
    return {index: (cache.captions[n], cache[n]["latents"]) for n, index in enumerate(cache.indices)}


def test_cache_in_float32_and_bfloat16_holds_the_encoder_latents(ae_and_images, tmp_path):
    ae, _, images = ae_and_images
    dataset = open_dataset(images, ae.image_size)
    manifest = cache_latents(ae, dataset, tmp_path / "f32", batch_size=4, shard_size=3, progress=False)
    half = cache_latents(ae, dataset, tmp_path / "bf16", batch_size=3, shard_size=4, num_workers=2, dtype="bfloat16", progress=False)
    assert manifest["count"] == half["count"] == 10 and manifest["skipped"] == half["skipped"] == 1
    assert manifest["shards"] == [f"shard-r000-{n:05d}" for n in range(3)]  # batches of 4, flushed at >= 3: 4, 4, 2 and half["dtype"] == "bfloat16"

    with torch.no_grad():
        expected = {i: ae.encode(dataset[i]["image"][None])[0] for i in range(10)}
    f32, bf16 = LatentDataset(tmp_path / "f32"), LatentDataset(tmp_path / "bf16", dtype=None)
    with safe_open(str(tmp_path / "bf16" / "shard-r000-00000.safetensors"), framework="pt") as f:
        assert f.get_slice("latents").get_dtype() == "BF16"
    for index, (caption, latents) in by_index(f32).items():
        assert caption == f"picture number {index}" and latents.dtype == torch.float32
        torch.testing.assert_close(latents, expected[index], atol=1e-5, rtol=1e-5)
    for index, (caption, latents) in by_index(bf16).items():
        assert latents.dtype == torch.bfloat16 and torch.equal(latents, expected[index].to(torch.bfloat16))
    assert LatentDataset(tmp_path / "bf16")[0]["latents"].dtype == torch.float32  # the default: fp32 items
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float32'\], got 'float16'"):
        cache_latents(ae, dataset, tmp_path / "x", dtype="float16")
    assert not (tmp_path / "x").exists()


def test_reads_the_single_process_layout_of_earlier_caches(tmp_path):
    """``shard-NNNNN`` files whose json is a bare list of captions."""
    latents = [torch.randn(3, 2, 4, 4), torch.randn(2, 2, 4, 4)]
    for n, block in enumerate(latents):
        save_file({"latents": block}, str(tmp_path / f"shard-{n:05d}.safetensors"))
        (tmp_path / f"shard-{n:05d}.json").write_text(json.dumps([f"c{n}{i}" for i in range(len(block))]))
    manifest = {"format": "vgt-latents", "count": 5, "skipped": 0, "shards": ["shard-00000", "shard-00001"], "channels": 2, "grid": [4, 4]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cache = LatentDataset(tmp_path)
    assert len(cache) == 5 and cache.indices is None and cache[4]["caption"] == "c11"
    assert torch.equal(torch.stack([cache[i]["latents"] for i in range(5)]), torch.cat(latents))
    assert torch.equal(cache[-1]["latents"], latents[1][1])
    with pytest.raises(IndexError):
        cache[5]


def test_handles_belong_to_one_process(tmp_path, monkeypatch):
    import pickle

    import vgt_core.latents as latents

    block = torch.randn(4, 2, 3, 3)
    save_file({"latents": block}, str(tmp_path / "shard-r000-00000.safetensors"))
    (tmp_path / "shard-r000-00000.json").write_text(json.dumps({"captions": list("abcd"), "indices": [0, 1, 2, 3]}))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "vgt-latents", "count": 4, "shards": ["shard-r000-00000"]}))
    cache = LatentDataset(tmp_path)
    assert torch.equal(cache[2]["latents"], block[2])
    parent = cache._slices[0]
    assert pickle.loads(pickle.dumps(cache))._slices == {}  # a spawned worker gets no handle of ours
    monkeypatch.setattr(latents.os, "getpid", lambda: -1)  # as seen from a forked worker
    assert torch.equal(cache[3]["latents"], block[3]) and cache._slices[0] is not parent
    monkeypatch.undo()
    loader = torch.utils.data.DataLoader(cache, batch_size=2, num_workers=2)
    assert torch.equal(torch.cat([b["latents"] for b in loader]), block)


MEASURE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from safetensors.torch import load_file
    from vgt_core.latents import LatentDataset

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    folder = sys.argv[1]
    start = rss()
    cache = LatentDataset(folder)
    items = [cache[i]["latents"] for i in (0, 1, len(cache) // 2, len(cache) - 1)]
    lazy = rss() - start
    eager = torch.cat([load_file(f"{folder}/{name}.safetensors")["latents"] for name in cache.manifest["shards"]])
    print(json.dumps({"lazy": lazy, "eager": rss() - start - lazy, "first": items[0].tolist()[0][0]}))
    """
)


def test_reading_the_cache_does_not_load_it_into_memory(tmp_path):
    """~64 MB of latents: opening the cache and reading items costs a few MB of RSS; loading it all costs 64."""
    shards, rows, first = 8, 1024, None
    for n in range(shards):
        block = torch.randn(rows, 32, 8, 8, generator=torch.Generator().manual_seed(n))  # 8 MB per shard
        first = block[0, 0, 0].tolist() if n == 0 else first
        save_file({"latents": block}, str(tmp_path / f"shard-r000-{n:05d}.safetensors"))
        (tmp_path / f"shard-r000-{n:05d}.json").write_text(json.dumps({"captions": ["x"] * rows, "indices": list(range(n * rows, (n + 1) * rows))}))
    manifest = {"format": "vgt-latents", "count": shards * rows, "skipped": 0, "shards": [f"shard-r000-{n:05d}" for n in range(shards)], "channels": 32, "grid": [8, 8]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(sys.modules["vgt_core"].__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["first"] == first  # the items are what was written
    print(f"cache {size / 2**20:.0f} MB: RSS +{measured['lazy'] / 2**20:.1f} MB lazy, +{measured['eager'] / 2**20:.1f} MB eager")
    assert measured["lazy"] < size / 8, measured
    assert measured["eager"] > size / 2, measured  # the measurement would see an eager load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_cache_the_same_latents_as_one(ae_and_images, tmp_path):
    """`accelerate launch --cpu --num_processes 2 -m vgt_core.cli cache-latents`: each rank writes its own shards,
    rank 0 the manifest; the (index, caption, latent) triples equal those of the 1-process cache."""
    ae, ae_dir, images = ae_and_images
    one = cache_latents(ae, open_dataset(images, ae.image_size), tmp_path / "one", batch_size=4, shard_size=2, progress=False)
    # --multi_gpu is accelerate's torchrun launcher (--cpu alone starts one process unless MPI is set up);
    # ACCELERATE_USE_CPU puts its ranks on the CPU over gloo, GPUs or not.
    env = {**os.environ, "PYTHONPATH": str(Path(sys.modules["vgt_core"].__file__).parents[1]), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "vgt_core.cli",
              "cache-latents", "--autoencoder", str(ae_dir), "--data", str(images), "--out", str(tmp_path / "two"),
              "--batch-size", "3", "--shard-size", "2", "--num-workers", "1", "--quiet"]  # fmt: skip
    done = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("cached 10 latents") == 1 and "2 processes" in done.stdout  # printed by rank 0 only

    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert two["count"] == one["count"] == 10 and two["skipped"] == one["skipped"] == 1 and two["processes"] == 2
    assert {s.split("-")[1] for s in two["shards"]} == {"r000", "r001"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # the shared temporary folder was renamed
    a, b = by_index(LatentDataset(tmp_path / "one")), by_index(LatentDataset(tmp_path / "two"))
    assert sorted(a) == sorted(b) == list(range(10))
    shard_json = json.loads((tmp_path / "two" / "shard-r001-00000.json").read_text())
    assert all(i % 2 == 1 for i in shard_json["indices"])  # rank 1 encoded the odd indices
    for index in a:
        assert a[index][0] == b[index][0]
        torch.testing.assert_close(a[index][1], b[index][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [(["--batch-size", "0"], "expected an integer >= 1, got 0"), (["--num-workers", "-1"], "expected an integer >= 0, got -1"),
     (["--shard-size", "x"], "expected an integer >= 1, got 'x'"), (["--dtype", "float16"], "invalid choice: 'float16'")],
)  # fmt: skip
def test_cli_rejects_bad_sizes_and_dtypes(args, message, capsys):
    from vgt_core.cli import build_parser

    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["cache-latents", "--autoencoder", "a", "--data", "d", "--out", "o", *args])
    assert exit.value.code == 2 and message in capsys.readouterr().err
