"""Generation speed: tokens per LM pass (m = 1, 4, 16), the KV cache, QueryAR vs MAR, measured side by side.

    python bench/generate.py [--grid 16] [--batches 1,16] [--repeats 2] [--threads 1] [--device cpu|cuda] [--json OUT]

For a grid x grid latent (default 16 x 16 = 256 tokens, the paper's size) and each batch size: seconds per call
of ``VGTGenerator.generate`` (latents only: no AE decode) and images/s, for QueryAR at m = 1, 4, 16 with and
without the KV cache (``GenerationConfig.use_cache``), and MAR at the same m, which gives it the same number of
LM passes (N / m steps). MAR at batch 16 runs m = 4 and 16 only (m = 1 there is minutes per call on 2 cores).
Classifier-free guidance is on and the flow head takes the preset's steps, as ``vgt generate`` would.

Ratios printed: cache speed-up (no-cache / cached) and parallel decoding (m = 1 / m, cached); at m = 1 also the
static cache (preallocated, written in place) against the dynamic one (``static_vs_dynamic_cache``: > 1 is faster). On a CPU it also
times one QueryAR call (64 tokens, batch 1, m = 1) at 1 thread against all cores, because the thread count can
matter more than any setting here on a busy machine. Weights are random: speed does not depend on training.
Time: one round is ~3 minutes on 2 quiet cores (batch 16 without the cache at m = 1 alone is ~1.5 minutes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import interleaved, parser, setup, thread_comparison, tiny_generator, write_json  # noqa: E402

PROMPT = "a photo of a red circle"


def main() -> None:
    p = parser(__doc__, repeats=2)
    p.add_argument("--preset", default="tiny-internvl3", help="QueryAR preset (its generator.max_grid is raised to --grid)")
    p.add_argument("--mar-preset", default="tiny-internvl3-mar", help="MAR preset (same backbone); '' to skip MAR")
    p.add_argument("--grid", type=int, default=16, help="latent side: grid x grid tokens (default 16: 256 tokens)")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--sampling-steps", type=int, default=None, help="flow-head steps (default: the preset's)")
    args = p.parse_args()
    info = setup(args)

    n = args.grid * args.grid
    grid = (args.grid, args.grid)
    batches = [int(b) for b in args.batches.split(",")]
    ms = [m for m in (1, 4, 16) if n % m == 0]
    qar, qar_preset = tiny_generator(args.preset, args.grid, args.device)
    mar = tiny_generator(args.mar_preset, args.grid, args.device)[0] if args.mar_preset else None
    base = qar_preset.generation.model_copy(update={"seed": 0})
    if args.sampling_steps:
        base = base.model_copy(update={"num_sampling_steps": args.sampling_steps})

    def call(gen, batch: int, m: int, cache: bool, size=grid, static: bool = False):
        config = base.model_copy(update={"tokens_per_step": m, "use_cache": cache, "cache_implementation": "static" if static else "dynamic"})
        return lambda: gen.generate([PROMPT] * batch, size, config)

    settings: dict[str, Any] = {}
    for b in batches:
        for m in ms:
            for cache in (True, False):
                settings[f"queryar b{b} m{m} {'cache' if cache else 'no-cache'}"] = call(qar, b, m, cache)
            if m == 1:  # the preallocated cache, written in place (generation.cache_implementation: static)
                settings[f"queryar b{b} m{m} static-cache"] = call(qar, b, m, True, static=True)
            if mar is not None and (b == 1 or m > 1):
                settings[f"mar b{b} m{m}"] = call(mar, b, m, True)
    # Warm-up on a 4x4 latent (same code paths, kernels and allocator), so no full-size call is wasted.
    for b in batches:
        for m in (1, 4, 16):
            for gen in (qar, mar) if mar is not None else (qar,):
                for cache in (True, False):
                    call(gen, b, m, cache, (4, 4))()
            call(qar, b, 1, True, (4, 4), static=True)()
    print(f"{args.preset} / {args.mar_preset or '-'}: {n} tokens, CFG {base.guidance_scale}, {base.num_sampling_steps} head steps, "
          f"batches {batches}, {args.repeats} rounds (median)")
    median = interleaved(settings, args.repeats, args.device, warmup=False)

    threads: dict[str, float] = {}
    if args.device == "cpu" and (os.cpu_count() or 1) > 1:
        print()
        threads = _thread_comparison(qar, base, args)

    print(f"\n{'setting':<26} {'s / call':>9} {'images/s':>9} {'cache x':>8} {'vs m=1':>7}")
    for name, sec in median.items():
        sampler, b, m, *rest = name.split()
        cache_x = f"{median[name.replace(' cache', ' no-cache')] / sec:.2f}" if rest == ["cache"] else ""
        ref = f"{sampler} {b} m1 cache" if sampler == "queryar" else f"{sampler} {b} m1"
        vs = f"{median[ref] / sec:.2f}" if ref in median and rest != ["no-cache"] else ""
        print(f"{name:<26} {sec:>9.3f} {int(b[1:]) / sec:>9.2f} {cache_x:>8} {vs:>7}")

    def ratio(a: str, b: str) -> float | None:
        return round(median[a] / median[b], 3) if a in median and b in median else None

    result: dict[str, Any] = {
        **info,
        "script": "bench/generate.py",
        "command": " ".join(sys.argv),
        "tokens": n,
        "num_sampling_steps": base.num_sampling_steps,
        "guidance_scale": base.guidance_scale,
        "repeats": args.repeats,
        "seconds": {k: round(v, 4) for k, v in median.items()},
    }
    for b in batches:
        suffix = "" if b == 1 else f"_batch{b}"
        result[f"speedup_16_vs_1{suffix}"] = ratio(f"queryar b{b} m1 cache", f"queryar b{b} m16 cache")
        result[f"speedup_4_vs_1{suffix}"] = ratio(f"queryar b{b} m1 cache", f"queryar b{b} m4 cache")
        result[f"kv_cache_speedup_{n}{suffix}"] = ratio(f"queryar b{b} m1 no-cache", f"queryar b{b} m1 cache")
        result[f"static_vs_dynamic_cache{suffix}"] = ratio(f"queryar b{b} m1 cache", f"queryar b{b} m1 static-cache")
        for m in ms:
            result[f"mar_vs_queryar_m{m}{suffix}"] = ratio(f"mar b{b} m{m}", f"queryar b{b} m{m} cache")
    if threads:
        result["thread_comparison"] = threads
    print("\n" + "\n".join(f"{k}: {v}" for k, v in result.items() if k.startswith(("speedup", "kv_cache", "mar_vs", "static")) and v is not None))
    write_json(args.json, result)


def _thread_comparison(gen, base, args) -> dict[str, float]:
    """One QueryAR call (8x8 latent or smaller, batch 1, m = 1, cached) at 1 thread and at all cores."""
    config = base.model_copy(update={"tokens_per_step": 1, "use_cache": True})
    side = min(8, args.grid)
    label = f"QueryAR generate, {side * side} tokens, batch 1, m=1, cached"
    out = thread_comparison(lambda: gen.generate([PROMPT], (side, side), config), args.repeats, label)
    return {"tokens": side * side, **out}


if __name__ == "__main__":
    main()
