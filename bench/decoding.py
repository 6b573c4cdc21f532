"""Decoding speed of QueryAR: tokens per LM pass (m = 1, 4, 16) and the KV cache, measured side by side.

    python bench/decoding.py [--preset tiny-internvl3] [--grid 8] [--batch 8] [--repeats 3] [--device cpu|cuda]

Prints, for each m, the seconds per image batch with and without the KV cache, and two ratios: cache-free /
cached (what the cache buys) and m=1 / m (what parallel decoding buys). Each setting runs ``repeats`` times in
an interleaved order and the median is kept, because shared machines are noisy: read the ratios, not the
seconds. Weights are random (speed does not depend on training), so this runs anywhere without a download.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vgt_core.config import GenerationConfig, load_presets
from vgt_core.generator import VGTGenerator


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny-internvl3")
    parser.add_argument("--grid", type=int, default=8, help="latent side: grid x grid tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampling-steps", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    preset = load_presets().preset(args.preset, {"generator.max_grid": args.grid})
    gen = VGTGenerator.from_specs(preset.backbone.model_dump(), preset.sampler.model_dump(), options=preset.generator)
    gen = gen.to(args.device).eval()
    grid = (args.grid, args.grid)
    prompts = ["a photo of a red circle"] * args.batch
    settings = [(m, cache) for m in (1, 4, 16) for cache in (True, False) if (args.grid * args.grid) % m == 0]
    times: dict[tuple[int, bool], list[float]] = {s: [] for s in settings}
    config = GenerationConfig(num_sampling_steps=args.sampling_steps, guidance_scale=3.0, seed=0)
    gen.generate(prompts, grid, config)  # warm-up (allocations, kernels)
    for _ in range(args.repeats):
        for m, cache in settings:
            run = config.model_copy(update={"tokens_per_step": m, "use_cache": cache})
            times[(m, cache)].append(timed(lambda: gen.generate(prompts, grid, run)))

    median = {s: statistics.median(t) for s, t in times.items()}
    n = args.grid * args.grid
    print(f"preset {args.preset}, {n} tokens, batch {args.batch}, CFG on, {args.sampling_steps} head steps, {args.device}")
    print(f"{'m':>3} {'LM passes':>9} {'cached s':>9} {'no-cache s':>10} {'cache speed-up':>14} {'vs m=1 (cached)':>15}")
    for m in sorted({m for m, _ in settings}):
        cached, plain = median[(m, True)], median[(m, False)]
        print(f"{m:>3} {n // m:>9} {cached:>9.3f} {plain:>10.3f} {plain / cached:>13.2f}x {median[(1, True)] / cached:>14.2f}x")


if __name__ == "__main__":
    main()
