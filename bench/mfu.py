"""VGT-AR training throughput and MFU at full size: a preset's generator (the real transformers LM class from the
typed-in hub config, random weights) trained on random latents in bf16 autocast.

    python bench/mfu.py [--preset internvl3-1b] [--batch 16] [--grid 16] [--attn sdpa|flash_attention_2|eager]
                        [--compile] [--gradient-checkpointing] [--peak-tflops X] [--json OUT]
    python bench/mfu.py --preset tiny-internvl3 --batch 4 --grid 4 --steps 4     # a CPU check that it runs

The default, ``internvl3-1b``, is InternVL3-1B's language model (Qwen2, 896 wide, 24 layers, ~0.5 B parameters
without its embeddings' copies) with the preset's flow head (12 blocks, 1536 wide): issue #15's "real Qwen2 LM class
at ~0.5 B parameters". A step is what ``train_generator`` runs per step on one GPU: the QueryAR loss of a batch
(prompt + 2 slots per latent token; 256 tokens at ``--grid 16``), backward, AdamW (fused), under bf16 autocast with
fp32 weights, as ``train_ar.mixed_precision: auto`` does on a bf16 GPU. The library's own loop adds its overhead on
top (bench/train_step.py measures that ratio).

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward (matrix
products and attention; the optimizer and element-wise work are not counted, as MFU conventionally does not).
MFU = counted FLOPs per step / median step seconds / the card's dense bf16 peak (a table of known cards, or
``--peak-tflops``). On a CPU the script prints TFLOP/s only.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from _common import parser, preset, setup, synchronize, write_json  # noqa: E402
from full_size import offline  # noqa: E402

# Dense bf16 peaks (no sparsity), TFLOP/s, from the vendors' data sheets; matched against the device name in order.
PEAKS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0)]


def peak_tflops(name: str) -> float | None:
    return next((tflops for key, tflops in PEAKS if key in name), None)


def build(args) -> torch.nn.Module:
    from vgt_core.generator import VGTGenerator

    p = preset(args.preset, {"generator.max_grid": max(args.grid, 8)})
    backbone = offline(p.backbone.model_dump(mode="json"))  # typed-in hub config, random weights (no download)
    backbone["options"].update(attn_implementation=args.attn, tokenizer=backbone["options"].get("tokenizer") or "byte-level")
    backbone["options"].pop("load_weights", None)  # built here, to be trained: random weights, really allocated
    torch.manual_seed(0)
    gen = VGTGenerator.from_specs(backbone, p.sampler.model_dump(mode="json"), options=p.generator)
    if args.gradient_checkpointing:
        from vgt_core.checkpointing import enable_gradient_checkpointing

        enable_gradient_checkpointing(gen.backbone)
    return gen.to(args.device).train()


def main() -> None:
    ap = parser(__doc__, repeats=1)
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--batch", type=int, default=16, help="samples per step (upstream: 32 per GPU)")
    ap.add_argument("--grid", type=int, default=16, help="latent side (default 16: 256 tokens, 448 px with DC-AE f32)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5; more with --compile)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    ap.add_argument("--compile", action="store_true", help="VGTGenerator.compile() (train_ar.compile)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: from the table)")
    args = ap.parse_args()
    info = setup(args)
    gen = build(args)
    lm = sum(q.numel() for q in gen.backbone.parameters())
    head = sum(q.numel() for q in gen.parameters()) - lm
    cuda = args.device.startswith("cuda")
    bf16 = cuda and torch.cuda.is_bf16_supported()

    b, n = args.batch, args.grid * args.grid
    g = torch.Generator().manual_seed(0)
    tokens = torch.nn.functional.layer_norm(torch.randn(b, n, 32, generator=g), (32,))
    latents = tokens.transpose(1, 2).reshape(b, 32, args.grid, args.grid).to(args.device)
    # short: the typed-in configs come with a byte-level stand-in tokenizer (one token per character)
    captions = [f"{i} red circles and a blue square" for i in range(b)]
    uncond = torch.zeros(b, dtype=torch.bool)
    optimizer = torch.optim.AdamW(gen.parameters(), lr=1e-4, fused=cuda or args.device == "cpu")

    def step() -> None:
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = gen(latents, captions, uncond)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # counted on the eager model: compiled kernels do not pass through torch's dispatcher, where the counter looks
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = gen(latents, captions, uncond)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if args.compile:
        gen.compile()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        synchronize(args.device)
        start = time.perf_counter()
        step()
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    achieved = flops / sec / 1e12
    name = info["device"]
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    prompt_tokens = gen.embed_prompts(captions[:1], image_tokens=n).mask.shape[1]
    print(f"{args.preset}: LM {lm / 1e6:.1f} M parameters, head and the rest {head / 1e6:.1f} M; batch {b}, {n} latent tokens "
          f"({prompt_tokens} prompt + {2 * n} QueryAR slots per sample); {'bf16 autocast' if bf16 else 'fp32'}, attention {args.attn}, "
          f"compile {args.compile}, gradient checkpointing {args.gradient_checkpointing}")
    print(f"step {sec * 1e3:.1f} ms (median of {args.steps}); {flops / 1e12:.4g} TFLOP counted per step; {achieved:.3g} TFLOP/s; "
          f"{b / sec:.1f} samples/s" + (f"; peak memory {memory:.1f} GiB" if memory is not None else ""))
    mfu = achieved / peak if peak else None
    print(f"MFU {mfu:.1%} of {peak:.0f} TFLOP/s (dense bf16)" if mfu is not None else "MFU: no peak known for this device (--peak-tflops)")
    write_json(args.json, {
        **info, "script": "bench/mfu.py", "command": " ".join(sys.argv), "preset": args.preset, "batch": b, "latent_tokens": n,
        "lm_parameters": lm, "other_parameters": head, "bf16": bf16, "attn": args.attn, "compile": args.compile,
        "gradient_checkpointing": args.gradient_checkpointing, "step_ms": round(sec * 1e3, 2), "tflop_per_step": round(flops / 1e12, 4),
        "tflops": round(achieved, 2), "peak_tflops": peak, "mfu": round(mfu, 4) if mfu is not None else None,
        "samples_per_s": round(b / sec, 2), "peak_memory_gib": round(memory, 2) if memory is not None else None,
    })  # fmt: skip


if __name__ == "__main__":
    main()
