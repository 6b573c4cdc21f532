"""Training-step overhead: the library's training loops against a bare PyTorch loop on the same model and batch.

    python bench/train_step.py [--preset tiny-internvl3] [--ae-preset P] [--ar-steps 40] [--ae-steps 12] [--repeats 3] [--gan] [--json OUT]

What is compared, exactly:

* **library**: ``vgt_core.training.autoregressive.train_generator`` (VGT-AR) and ``...autoencoder.train_autoencoder``
  (VGT-AE stage 1), run for N steps where accelerate puts them (mixed precision "auto": fp32 on a CPU, bf16 on a
  GPU that has it; the bare loop autocasts the same way). The loop body is
  not a function of its own, so the script times it from outside: ``TrainingRun.advance`` (called once per step,
  after the optimizer step and EMA) is wrapped to record a timestamp, and the seconds between consecutive steps
  after the first ``--skip`` are the step times. Setup (model build, accelerate, loader) and the final checkpoint
  are outside them; a step's time includes everything the trainer does per step: the data loader (AR: the latent
  cache read from a folder; AE: images held in memory, transformed per item as any dataset is), per-sample random
  draws (``SampleDraws``), prompt dropout, forward and loss, backward, ``float(loss)``, gradient clipping, AdamW
  (or Muon + AdamW where the preset sets ``train_ar.optimizer: muon``),
  the LR schedule, the EMA, and the log every ``log_every`` steps. Sample images and checkpoints fall on no
  timed step (``sample_count`` 0, checkpoints only at the end).
* **bare**: a loop written here: the same model (built by the same functions from the same seed), the same data
  held as tensors (the batches the library's loader draws from, in turn); per step AR: ``loss = gen(latents,
  captions, uncond)`` (the global RNG), ``backward``; AE: forward, MSE + the library's ``PerceptualLoss`` (random
  weights, as the preset) + distillation MSE to a frozen copy of the encoder, ``backward``; then, in both, what the
  preset asks of every step and any hand-written loop for it would do too: gradient clipping at ``grad_clip``
  (``torch.nn.utils.clip_grad_norm_(..., foreach=True)``), AdamW with the library's settings (fused where torch has
  it, as ``TrainingRun.adamw``; the library's ``MuonWithAdamW`` for a Muon preset), the warm-up + cosine LR schedule, ``zero_grad(set_to_none=True)``, and the EMA at
  ``ema_decay`` (diffusers' ``EMAModel``, ``foreach``) when the preset has one. These are the recipe, not plumbing:
  a bare loop without them computes something else, and the ratio would charge the library for the work it was
  asked to do. (Before 2026-12-06 the bare loop had no clipping, EMA or schedule: clipping and the EMA were most of
  the 1.15-1.20 measured then; and without the warm-up the shapes-demo AE's full LR from step 1 made its backward
  ~20 % slower, which read as a library faster than the bare loop.) No loader, per-sample draws, NaN check or
  logging: those are what the ratio measures.

On a CPU with several cores it also times the bare AR loop (15 steps) at 1 thread against one per core, and on a CPU
the bare AE loop with denormal floats against flushed to zero (``denormal_comparison``: the library's CPU runs flush
them, ``TrainingRun``; SiLU's gradient makes them and x86 takes a slow path on each). For a preset that trains with
Muon, ``muon_comparison`` times one optimizer step of torch's ``Muon`` against vgt's ``BatchedMuon`` on the same
matrices.

``overhead_ratio`` = median library step / median bare step (AR), ``ae_overhead_ratio`` the same for stage 1. Runs
alternate library and bare ``--repeats`` times; each ratio is of medians over all timed steps. ``--profile`` adds a
cProfile of one library AR run and one library AE stage-1 run (the functions where the step's time goes);
``--preset shapes-demo`` measures the demo's own models and batch sizes.
"""

from __future__ import annotations

import copy
import os
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from _common import parser, preset, setup, synchronize, thread_comparison, timed, write_json  # noqa: E402

# -- step timestamps of the library's loops ------------------------------------------------------------------------

STAMPS: list[float] = []


def _record_steps() -> None:
    """Wrap ``TrainingRun.advance`` (one call per finished step) to record when each step ends."""
    from vgt_core.training.run import TrainingRun

    original = TrainingRun.advance

    def advance(self, scalars=None):
        STAMPS.append(time.perf_counter())
        return original(self, scalars)

    TrainingRun.advance = advance


def _step_times(stamps: list[float], skip: int) -> list[float]:
    """Seconds of steps skip+1 .. N from the end-of-step stamps of steps 1 .. N."""
    return [b - a for a, b in zip(stamps[skip - 1 :], stamps[skip:])] if skip >= 1 else [b - a for a, b in zip(stamps, stamps[1:])]


def _autocast(device: str, setting: str):
    """The precision the library's trainer resolves ``setting`` to (bf16 on a GPU that has it, fp32 on a CPU)."""
    from vgt_core.training.run import mixed_precision

    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mixed_precision(setting) == "bf16")


def _bare_optimizer(groups: list[dict], cfg) -> torch.optim.AdamW:
    """AdamW as the library builds it (``TrainingRun.adamw``): fused on a CPU or CUDA device."""
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)


def _bare_schedule(optimizer: torch.optim.Optimizer, cfg):
    """The preset's warm-up and cosine decay (the same ``LambdaLR`` as the library's)."""
    from vgt_core.training.run import cosine_with_warmup

    return cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps, cfg.end_lr / cfg.lr)


def _bare_update(params: list, optimizer: torch.optim.Optimizer, schedule, ema, cfg) -> None:
    """Clip (when the preset does), step, schedule, zero the gradients, update the EMA (when the preset has one)."""
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(params)


def _bare_ema(params: list, cfg):
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay else None


# -- data ---------------------------------------------------------------------------------------------------------


def _images(count: int, size: int) -> list[dict[str, Any]]:
    """In-memory PIL images with captions (random pixels: speed does not depend on content)."""
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(count, size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return [{"image": Image.fromarray(p), "caption": f"a photo of object {i}"} for i, p in enumerate(pixels)]


# -- AR --------------------------------------------------------------------------------------------------------------


def _run(fn, profile: bool) -> str:
    """Run ``fn``; with ``profile``, under cProfile, returning its top 25 functions by own time."""
    if not profile:
        fn()
        return ""
    prof = cProfile.Profile()
    prof.runcall(fn)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return text.getvalue()


def ar_library(p, ae_dir: Path, cache: Path, steps: int, skip: int, work: Path, profile: bool = False) -> tuple[list[float], str]:
    from vgt_core.training.autoregressive import train_generator

    STAMPS.clear()
    out = Path(tempfile.mkdtemp(dir=work))
    report = _run(lambda: train_generator(p, ae_dir, out, data=str(cache), steps=steps, progress=False), profile)
    return _step_times(STAMPS, skip), report


def ar_bare(p, ae_dir: Path, batch: dict[str, Any], steps: int, skip: int, device: str = "cpu") -> list[float]:
    from vgt_core.autoencoder import VGTAutoencoder
    from vgt_core.compose import build_generator

    cfg = p.train_ar
    torch.manual_seed(cfg.seed)
    ae = VGTAutoencoder.from_pretrained(ae_dir)
    gen = build_generator(p, ae).to(device).train()
    if gen.head.repa_projector is not None:
        gen.head.repa_projector.requires_grad_(False)  # as the library: unused without REPA
    params = [q for q in gen.parameters() if q.requires_grad]
    if cfg.optimizer == "muon":  # the recipe's optimizer (torch's Muon + AdamW), not plumbing: the same class
        from vgt_core.training.muon import MuonWithAdamW, hidden_matrices

        hidden = hidden_matrices(gen, outputs=gen.output_layers)
        optimizer = MuonWithAdamW(gen.named_parameters(), hidden, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=True)
    else:
        optimizer = _bare_optimizer([{"params": params}], cfg)
    ema = _bare_ema(params, cfg)
    schedule = _bare_schedule(optimizer, cfg)
    size = cfg.batch_size  # the cached batches in turn: the library's loader also sees new latents every step
    batches = [(lat, batch["captions"][i * size : (i + 1) * size]) for i, lat in enumerate(batch["latents"].to(device).split(size))]
    stamps = [time.perf_counter()]
    for i in range(steps):
        latents, captions = batches[i % len(batches)]
        uncond = torch.rand(len(captions), device=device) < cfg.prompt_dropout
        with _autocast(device, cfg.mixed_precision):
            loss = gen(latents, captions, uncond)
        loss.backward()
        _bare_update(params, optimizer, schedule, ema, cfg)
        synchronize(device)
        stamps.append(time.perf_counter())
    return _step_times(stamps[1:], skip)


# -- AE stage 1 ------------------------------------------------------------------------------------------------------


def ae_library(p, data: list[dict[str, Any]], steps: int, skip: int, work: Path, profile: bool = False) -> tuple[list[float], str]:
    from vgt_core.training.autoencoder import train_autoencoder

    STAMPS.clear()
    out = Path(tempfile.mkdtemp(dir=work))
    report = _run(lambda: train_autoencoder(p, out, stage=1, data=data, steps=steps, progress=False), profile)
    return _step_times(STAMPS, skip), report


def ae_bare(p, images: torch.Tensor, steps: int, skip: int, device: str = "cpu") -> list[float]:
    from vgt_core.compose import build_autoencoder
    from vgt_core.losses import PerceptualLoss

    cfg = p.train_ae.stage1
    torch.manual_seed(cfg.seed)
    ae = build_autoencoder(p).to(device)
    ae.set_latent_regularization(cfg.latent_norm, cfg.noise_sigma)
    teacher = copy.deepcopy(ae.encoder).requires_grad_(False).eval()
    perceptual = PerceptualLoss.for_stage(cfg)
    if perceptual is not None:
        perceptual.to(device)
    batches = images.to(device).split(cfg.batch_size)  # the library's loader also sees new images every step
    if cfg.encoder_lr_mult == 0:
        ae.encoder.requires_grad_(False)
    encoder = [q for q in ae.encoder.parameters() if q.requires_grad]
    ids = {id(q) for q in ae.encoder.parameters()}
    rest = [q for q in ae.parameters() if id(q) not in ids and q.requires_grad]
    groups = [{"params": rest}] + ([{"params": encoder, "lr": cfg.lr * cfg.encoder_lr_mult}] if encoder else [])
    optimizer = _bare_optimizer(groups, cfg)
    schedule = _bare_schedule(optimizer, cfg)
    params = [q for q in ae.parameters() if q.requires_grad]
    ema = _bare_ema(params, cfg)
    ae.train()
    stamps = [time.perf_counter()]
    for i in range(steps):
        images = batches[i % len(batches)]
        with _autocast(device, cfg.mixed_precision):
            out = ae(images)
        recon = out["reconstruction"].float()
        loss = cfg.mse_weight * F.mse_loss(recon, images)
        if perceptual is not None:
            loss = loss + cfg.perceptual_weight * perceptual(recon, images)["perceptual"]
        if cfg.distill_weight > 0:
            with torch.no_grad():
                target = teacher(images)
            loss = loss + cfg.distill_weight * F.mse_loss(out["features"].float(), target.float())
        loss.backward()
        _bare_update(params, optimizer, schedule, ema, cfg)
        synchronize(device)
        stamps.append(time.perf_counter())
    return _step_times(stamps[1:], skip)


def denormal_comparison(run, repeats: int) -> dict[str, float]:
    """``run`` (step times of one bare run) with denormal floats computed, as x86 does by default, and flushed to zero,
    as ``TrainingRun`` sets on a CPU; alternating, ``repeats`` rounds, medians of all timed steps. The flag belongs to
    a thread: exact at the default ``--threads 1``; with more, torch's worker threads keep what they started with."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            times[flush] += run()
    torch.set_flush_denormal(True)
    kept, flushed = statistics.median(times[False]), statistics.median(times[True])
    print(f"bare AE stage-1 loop, steps 26-60: {kept * 1e3:.1f} ms/step with denormals, {flushed * 1e3:.1f} flushed: {kept / flushed:.2f}x")
    return {"ms_per_step_denormals": round(kept * 1e3, 2), "ms_per_step_flushed": round(flushed * 1e3, 2), "speedup": round(kept / flushed, 3)}


def muon_comparison(p, repeats: int, device: str = "cpu", steps: int = 20) -> dict[str, float]:
    """One Muon step over the preset generator's hidden matrices (random gradients): torch's ``Muon``, one
    Newton–Schulz call per matrix, against vgt's ``BatchedMuon``, one per shape; alternating, medians of all steps."""
    from vgt_core.generator import VGTGenerator
    from vgt_core.training.muon import BatchedMuon, hidden_matrices

    gen = VGTGenerator.from_specs(p.backbone.model_dump(), p.sampler.model_dump(), options=p.generator).to(device)
    matrices = [q for q in gen.parameters() if id(q) in hidden_matrices(gen, outputs=gen.output_layers)]
    for q in matrices:
        q.grad = torch.randn_like(q)
    options = {"lr": 1e-3, "weight_decay": 0.0, "adjust_lr_fn": "match_rms_adamw"}
    optimizers = {"torch": torch.optim.Muon(matrices, **options), "batched": BatchedMuon(matrices, **options)}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for name, o in optimizers.items():  # warm-up, untimed
        o.step()
    for _ in range(repeats):
        for name, o in optimizers.items():
            for _ in range(steps):
                times[name].append(timed(o.step, device))
    torch_ms, batched_ms = (statistics.median(times[k]) * 1e3 for k in ("torch", "batched"))
    shapes = len({(min(q.shape), max(q.shape)) for q in matrices})
    print(f"Muon step, {len(matrices)} matrices in {shapes} shapes: torch.optim.Muon {torch_ms:.1f} ms, BatchedMuon {batched_ms:.1f} ms: {torch_ms / batched_ms:.2f}x")
    return {"matrices": len(matrices), "shapes": shapes, "torch_ms": round(torch_ms, 2), "batched_ms": round(batched_ms, 2), "speedup": round(torch_ms / batched_ms, 3)}


def with_world_tokenizer(p, work: Path):
    """A shapes-world preset (``shapes-demo``) reads its word-level tokenizer from the understanding VLM the demo
    trains first; built from its config here, it gets the same tokenizer, saved to ``work``. Other presets as given."""
    if p.dataset is None or p.dataset.name != "shapes" or p.backbone.options.get("tokenizer"):
        return p
    from vgt_shapes.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(work / "tokenizer")
    return p.model_copy(update={"backbone": p.backbone.model_copy(update={"options": {**p.backbone.options, "tokenizer": str(work / "tokenizer")}})})


# -- main ------------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = parser(__doc__, repeats=3)
    ap.add_argument("--preset", default="tiny-internvl3")
    ap.add_argument("--ae-preset", default=None, help="the preset of the AE stage-1 loops (default: --preset)")
    ap.add_argument("--ar-steps", type=int, default=40, help="steps per AR run (default 40)")
    ap.add_argument("--ae-steps", type=int, default=12, help="steps per AE stage-1 run (default 12)")
    ap.add_argument("--skip", type=int, default=3, help="first steps of each run left out of the timing (default 3)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's train_ar / stage-1 batch)")
    ap.add_argument("--gan", action="store_true", help="AE: keep the preset's GAN term on from the first step (default: off)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one extra library AR run and AE stage-1 run (top 25 by own time)")
    args = ap.parse_args()
    # The library's trainers run where accelerate puts them (the GPU when there is one): the bare loops follow.
    accelerate_device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device != accelerate_device:
        ap.error(f"--device {args.device}: the library's trainers run on {accelerate_device} here (accelerate's choice)")
    dev = args.device
    info = setup(args)
    _record_steps()

    from vgt_core.compose import build_autoencoder
    from vgt_core.data import open_dataset
    from vgt_core.latents import LatentDataset, cache_latents

    quiet = {"log_every": 20, "sample_every": 10**6, "checkpoint_every": 10**6}
    overrides: dict[str, Any] = {f"train_ar.{k}": v for k, v in quiet.items()}
    overrides["train_ar.sample_count"] = 0
    overrides.update({f"train_ae.stage1.{k}": v for k, v in quiet.items()})
    if args.gan:
        overrides["train_ae.stage1.gan_start"] = 0
    else:
        overrides["train_ae.stage1.gan_weight"] = 0.0
    if args.batch:
        overrides["train_ar.batch_size"] = overrides["train_ae.stage1.batch_size"] = args.batch
    p = preset(args.preset, overrides)
    pe = preset(args.ae_preset, overrides) if args.ae_preset else p
    ar_batch, ae_batch = p.train_ar.batch_size, pe.train_ae.stage1.batch_size

    with tempfile.TemporaryDirectory(prefix="vgt-bench-") as tmp:
        work = Path(tmp)
        p = with_world_tokenizer(p, work)
        torch.manual_seed(0)
        ae = build_autoencoder(p).eval()
        ae.save_pretrained(work / "ae")
        data = _images(ar_batch * 4, ae.image_size)
        cache_latents(ae, open_dataset(data, ae.image_size), work / "cache", batch_size=ar_batch, progress=False, source=work / "ae")
        cached = LatentDataset(work / "cache")
        ar_data = {"latents": torch.stack([cached[i]["latents"] for i in range(len(cached))]), "captions": [cached[i]["caption"] for i in range(len(cached))]}
        ae_size = pe.image_size or build_autoencoder(pe).image_size
        ae_data = _images(ae_batch * 4, ae_size)
        ae_images = torch.stack([open_dataset(ae_data, ae_size)[i]["image"] for i in range(len(ae_data))])

        times: dict[str, list[float]] = {"ar library": [], "ar bare": [], "ae library": [], "ae bare": []}
        # warm-up: one short run of each (kernels, allocator, imports), not timed
        ar_library(p, work / "ae", work / "cache", args.skip + 2, args.skip, work)
        ar_bare(p, work / "ae", ar_data, args.skip + 2, args.skip, dev)
        ae_library(pe, ae_data, args.skip + 2, args.skip, work)
        ae_bare(pe, ae_images, args.skip + 2, args.skip, dev)
        print(f"{args.preset}: AR batch {ar_batch} ({tuple(ar_data['latents'].shape[1:])} latents), {args.ar_steps} steps a run; "
              f"{args.ae_preset or args.preset}: AE stage 1 batch {ae_batch} ({ae_size} px), {args.ae_steps} steps a run, GAN {'on' if args.gan else 'off'}; "
              f"first {args.skip} steps of each run untimed; {args.repeats} rounds")
        rounds: list[dict[str, float]] = []
        for r in range(args.repeats):
            now = {
                "ar library": ar_library(p, work / "ae", work / "cache", args.ar_steps, args.skip, work)[0],
                "ar bare": ar_bare(p, work / "ae", ar_data, args.ar_steps, args.skip, dev),
                "ae library": ae_library(pe, ae_data, args.ae_steps, args.skip, work)[0],
                "ae bare": ae_bare(pe, ae_images, args.ae_steps, args.skip, dev),
            }
            for k, v in now.items():
                times[k] += v
            rounds.append({"ar": statistics.median(now["ar library"]) / statistics.median(now["ar bare"]),
                           "ae": statistics.median(now["ae library"]) / statistics.median(now["ae bare"])})
            print(f"round {r + 1} (medians, ms): " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f}" for k, v in now.items())
                  + f"; ratios AR {rounds[-1]['ar']:.3f}, AE {rounds[-1]['ae']:.3f}", flush=True)
        threads: dict[str, float] = {}
        if dev == "cpu" and (os.cpu_count() or 1) > 1:  # the bare AR loop (15 steps) at 1 thread and at all cores
            print()
            threads = thread_comparison(lambda: ar_bare(p, work / "ae", ar_data, 15, 0), args.repeats, "bare AR loop, 15 steps")
        denormals: dict[str, float] = {}
        if dev == "cpu":  # the library's CPU runs flush denormals (TrainingRun); what that is worth, on the bare AE loop
            print()
            # 60 steps, the first 25 untimed: a fresh decoder's SiLU inputs go far negative only after ~20 steps
            denormals = denormal_comparison(lambda: ae_bare(pe, ae_images, 60, 25, dev), args.repeats)
        muon: dict[str, float] = {}
        if p.train_ar.optimizer == "muon":
            print()
            muon = muon_comparison(p, args.repeats, dev)
        profiles = {}
        if args.profile:
            profiles["AR"] = ar_library(p, work / "ae", work / "cache", args.ar_steps, args.skip, work, profile=True)[1]
            profiles["AE stage-1"] = ae_library(pe, ae_data, args.ae_steps, args.skip, work, profile=True)[1]

    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{'loop':<12} {'ms / step':>10} {'steps timed':>12}")
    for k, v in median.items():
        print(f"{k:<12} {v * 1e3:>10.2f} {len(times[k]):>12}")
    result = {
        **info,
        "script": "bench/train_step.py",
        "command": " ".join(sys.argv),
        "preset": args.preset,
        "ae_preset": args.ae_preset or args.preset,
        "ar_batch": ar_batch,
        "ae_batch": ae_batch,
        "gan": args.gan,
        "ms_per_step": {k: round(v * 1e3, 3) for k, v in median.items()},
        "overhead_ratio": round(median["ar library"] / median["ar bare"], 3),
        "ae_overhead_ratio": round(median["ae library"] / median["ae bare"], 3),
        "thread_comparison": threads,
        "denormal_comparison": denormals,
        "muon_comparison": muon,
        "ratios_per_round": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
    }
    print(f"\noverhead_ratio (AR library / bare): {result['overhead_ratio']}\nae_overhead_ratio (AE stage 1 library / bare): {result['ae_overhead_ratio']}")
    for name, report in profiles.items():
        print(f"\ncProfile of one library {name} run (setup included; top 25 by own time):\n" + report)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
