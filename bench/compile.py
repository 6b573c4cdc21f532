"""torch.compile against eager: ``VGTGenerator.compile`` (the language model and the flow head), side by side.

    python bench/compile.py [--preset tiny-internvl3] [--grid 16] [--batches 1,16] [--train-steps 30] [--json OUT]

Two copies of one generator (random weights), one compiled: what ``vgt generate --compile`` and
``train_ar.compile`` run.

* **generation**: seconds per ``generate`` call of a grid x grid latent (default 256 tokens), QueryAR at m = 1 and 16
  with the KV cache per batch size, and at batch 1 also m = 1 without it; CFG and head steps as the preset's. The first compiled
  call of each shape compiles (its seconds are printed as ``compile s``), then both copies are timed interleaved.
* **training**: one AR step (the loss of ``VGTGenerator.forward``, backward, AdamW) on a batch held in memory, at the
  preset's ``train_ar.batch_size`` on a 4 x 4 latent; the first ``--skip`` steps (where compiling happens) untimed,
  the median of the rest.

Ratios printed: ``eager / compiled`` per setting, and the KV-cache speed-up (no-cache / cache at m = 1) both eager
and compiled, since the cache's gain is what the per-call overhead compiling removes decides.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import interleaved, parser, setup, synchronize, tiny_generator, write_json  # noqa: E402

PROMPT = "a photo of a red circle"


def main() -> None:
    p = parser(__doc__, repeats=2)
    p.add_argument("--preset", default="tiny-internvl3", help="a preset whose backbone builds from its config")
    p.add_argument("--grid", type=int, default=16, help="generation: latent side (default 16: 256 tokens)")
    p.add_argument("--batches", default="1,16", help="generation: comma-separated batch sizes (default 1,16)")
    p.add_argument("--train-steps", type=int, default=30, help="training: steps per variant (default 30)")
    p.add_argument("--skip", type=int, default=5, help="training: first steps left out of the timing (default 5)")
    p.add_argument("--mode", default=None, help="torch.compile mode (default: torch's)")
    args = p.parse_args()
    info = setup(args)
    options = {"mode": args.mode} if args.mode else {}
    result: dict[str, Any] = {**info, "script": "bench/compile.py", "command": " ".join(sys.argv)}

    eager, preset = tiny_generator(args.preset, args.grid, args.device)
    compiled = copy.deepcopy(eager)
    compiled.compile(**options)
    grid, n = (args.grid, args.grid), args.grid * args.grid
    base = preset.generation.model_copy(update={"seed": 0})

    def call(gen, batch: int, m: int, cache: bool):
        config = base.model_copy(update={"tokens_per_step": m, "use_cache": cache})
        return lambda: gen.generate([PROMPT] * batch, grid, config)

    settings, compile_seconds = {}, {}
    for b in (int(x) for x in args.batches.split(",")):
        # without the cache at batch 1 only: at batch 16 one uncached call is ~1.5 minutes on 2 cores
        for m, cache in ((1, True), (16, True), (1, False))[: 3 if b == 1 else 2]:
            if n % m:
                continue
            name = f"b{b} m{m} {'cache' if cache else 'no-cache'}"
            started = time.perf_counter()
            call(compiled, b, m, cache)()  # compiles this shape (and warms it up)
            compile_seconds[name] = round(time.perf_counter() - started, 1)
            call(eager, b, m, cache)()
            settings[f"eager {name}"], settings[f"compiled {name}"] = call(eager, b, m, cache), call(compiled, b, m, cache)
    print(f"{args.preset}: generation of {n} tokens, CFG {base.guidance_scale}, {base.num_sampling_steps} head steps, "
          f"{args.repeats} rounds (median)")
    median = interleaved(settings, args.repeats, args.device, warmup=False)
    print(f"\n{'setting':<20} {'eager s':>9} {'compiled s':>11} {'eager/compiled':>15} {'compile s':>10}")
    generation = {}
    for name, first in compile_seconds.items():
        e, c = median[f"eager {name}"], median[f"compiled {name}"]
        generation[name] = {"eager_s": round(e, 4), "compiled_s": round(c, 4), "speedup": round(e / c, 3), "first_call_s": first}
        print(f"{name:<20} {e:>9.3f} {c:>11.3f} {e / c:>15.2f} {first:>10.1f}")
    result["generation"] = generation
    for b in args.batches.split(","):
        for kind in ("eager", "compiled"):
            a, c = f"{kind} b{b} m1 no-cache", f"{kind} b{b} m1 cache"
            if a in median:
                key = f"kv_cache_speedup_{n}_{kind}" + ("" if b == "1" else f"_batch{b}")
                result[key] = round(median[a] / median[c], 3)
                print(f"{key}: {result[key]}")

    result["training"] = training(eager, compiled, preset, args)
    write_json(args.json, result)


def training(eager, compiled, preset, args) -> dict[str, float]:
    """Median ms per AR training step of the eager and the compiled copy, alternating runs."""
    cfg = preset.train_ar
    b = cfg.batch_size
    g = torch.Generator().manual_seed(0)
    latents = torch.nn.functional.layer_norm(torch.randn(b, 16, 32, generator=g), (32,)).transpose(1, 2).reshape(b, 32, 4, 4)
    latents = latents.to(args.device)
    captions = [f"a photo of object {i}" for i in range(b)]
    uncond = torch.zeros(b, dtype=torch.bool)

    def run(gen) -> tuple[list[float], float]:
        gen.train()
        optimizer = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, fused=True)
        stamps = [time.perf_counter()]
        for _ in range(args.train_steps):
            gen(latents, captions, uncond).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(args.device)
            stamps.append(time.perf_counter())
        gen.eval()
        steps = [end - start for start, end in zip(stamps, stamps[1:])]  # not b, the batch size here
        return steps[args.skip :], sum(steps[: args.skip])

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    first: dict[str, float] = {}
    for r in range(args.repeats + 1):
        for name, gen in (("eager", eager), ("compiled", compiled)):
            steps, head = run(gen)
            if r == 0:
                first[name] = head  # the first run compiles: its first steps say what compiling costs
            else:
                times[name] += steps
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"\ntraining step, batch {b}, 4x4 latent: eager {e * 1e3:.1f} ms, compiled {c * 1e3:.1f} ms: {e / c:.2f}x; "
          f"first {args.skip} steps {first['eager']:.1f} s eager, {first['compiled']:.1f} s compiled")
    return {"batch": b, "eager_ms": round(e * 1e3, 2), "compiled_ms": round(c * 1e3, 2), "speedup": round(e / c, 3),
            f"first_{args.skip}_steps_s_eager": round(first["eager"], 2), f"first_{args.skip}_steps_s_compiled": round(first["compiled"], 2)}


if __name__ == "__main__":
    main()
