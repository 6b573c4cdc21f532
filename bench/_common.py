"""What every bench script shares: the device line, interleaved timing with medians, tiny models with random
weights, and the JSON output. Not part of the library: scripts import it as ``from _common import ...`` (Python
puts the script's own folder on the path).

Shared machines are noisy, so a script compares settings side by side in one process: every setting runs once as a
warm-up (not timed), then ``repeats`` rounds each run every setting once in the same order, and the median per
setting is kept. Read the ratios; absolute seconds are not comparable between runs or machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def parser(doc: str, *, repeats: int) -> argparse.ArgumentParser:
    """The options every script takes: ``--json OUT``, ``--repeats``, ``--device``, ``--threads``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures to this JSON file")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds per setting; the median is kept (default {repeats})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1 if not torch.cuda.is_available() else 0,
        help="torch intra-op threads; 0 = torch's own choice (one per core). Default on a CPU: 1, because tiny "
        "models on a shared machine ran many times faster on 1 (bench/generate.py measures it; docs/benchmarks.md)",
    )
    return p


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Apply ``--threads``, print the device line and return it (it goes into the JSON)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    info = device_info(args.device)
    print(
        f"device: {info['device']} | torch {info['torch']} | threads {info['torch_threads']} | "
        f"cores {info['cpu_count']} | load average {info['load_average']}"
    )
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_model()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "device": f"{device} ({name})",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in load],
        "date": time.strftime("%Y-%m-%d"),
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str = "cpu") -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(settings: dict[str, Callable[[], Any]], repeats: int, device: str = "cpu", *, warmup: bool = True) -> dict[str, float]:
    """Median seconds per setting: one untimed warm-up call each, then ``repeats`` rounds over all settings in
    turn (so that a slow spell of a shared machine hits every setting alike)."""
    if warmup:
        for fn in settings.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, fn in settings.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def thread_comparison(fn: Callable[[], Any], repeats: int, label: str) -> dict[str, float]:
    """Median seconds of ``fn`` at 1 thread and at one thread per core, interleaved; torch's setting is restored.

    On a shared machine small ops that open a parallel region (LayerNorm) can wait a scheduler slice for the
    busy core each time: the slow-down this prints is what ``--threads 0`` (torch's default) costs there."""
    chosen, cores = torch.get_num_threads(), os.cpu_count() or 1

    def at(n: int) -> Callable[[], Any]:
        def run() -> Any:
            torch.set_num_threads(n)
            return fn()

        return run

    try:
        median = interleaved({"1": at(1), str(cores): at(cores)}, repeats)
    finally:
        torch.set_num_threads(chosen)
    ratio = median[str(cores)] / median["1"]
    print(f"threads, {label}: 1 thread {median['1']:.3f} s, {cores} threads {median[str(cores)]:.3f} s: "
          f"{cores} threads take {ratio:.2f}x the time of 1")
    return {"seconds_1_thread": round(median["1"], 4), f"seconds_{cores}_threads": round(median[str(cores)], 4),
            f"slowdown_{cores}_threads_vs_1": round(ratio, 3)}


def preset(name: str, overrides: dict[str, Any] | None = None):
    """A preset of registry.yaml with dotted overrides (e.g. ``{"generator.max_grid": 16}``)."""
    from vgt_core.config import load_presets

    return load_presets().preset(name, overrides or {})


def tiny_generator(preset_name: str, grid: int, device: str):
    """The preset's generator (random weights) with a position grid of at least ``grid`` x ``grid``, in eval mode.
    A language model built from a config gets positions for the grid too: QueryAR's sequence holds 2 slots per
    token and the prompt (a 16 x 16 grid needs over 512, the tiny presets' ``max_position_embeddings``)."""
    from vgt_core.generator import VGTGenerator

    overrides: dict[str, Any] = {"generator.max_grid": grid}
    text = (preset(preset_name).backbone.options.get("config") or {}).get("text_config") or {}
    needed = 2 * grid * grid + 64  # the image, its start token and room for a prompt
    if text.get("max_position_embeddings", needed) < needed:
        overrides["backbone.options.config.text_config.max_position_embeddings"] = needed
    p = preset(preset_name, overrides)
    gen = VGTGenerator.from_specs(p.backbone.model_dump(), p.sampler.model_dump(), options=p.generator)
    return gen.to(device).eval(), p


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {path}")
