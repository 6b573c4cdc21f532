"""The ``vgt`` command. Each sub-command is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from vgt_core.errors import VGTError

COMMANDS: dict[str, Callable[[argparse.Namespace], int | None]] = {}
IMAGES_KIND = "vgt-images"  # the output kind of `vgt generate --out FOLDER`
RUN_OUT_HELP = (
    "a new or empty folder, or this run's own folder (--resume continues it); "
    "a folder of other files is refused, and so is one another run is writing"
)


def command(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        COMMANDS[name] = fn
        return fn

    return wrap


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    from vgt_core.config import parse_override_value

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise VGTError(f"--set expects KEY=VALUE (dotted key), got {pair!r}")
        try:
            out[key] = parse_override_value(value)  # YAML, and 1e-6 is a number (YAML 1.1 reads it as text)
        except yaml.YAMLError as exc:
            raise VGTError(f"--set {key}: the value is not valid YAML: {exc}") from None
    return out


def _preset(args: argparse.Namespace):
    from vgt_core.config import load_presets

    return load_presets(args.registry).preset(args.preset, _overrides(args.set))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


# -- discovery ----------------------------------------------------------------------------------------------------


@command("plugins")
def cmd_plugins(args: argparse.Namespace) -> None:
    from vgt_core.plugins import list_components

    rows = [
        {"kind": c.kind, "name": c.name, "package": c.package, "version": c.version, "plugin": c.plugin, "description": c.description}
        for c in list_components()
    ]
    if args.json:
        _print_json(rows)
        return
    for r in rows:
        print(f"{r['kind']:9} {r['name']:16} {r['package']} {r['version']:8} {r['description']}")


@command("presets")
def cmd_presets(args: argparse.Namespace) -> None:
    from vgt_core.config import load_presets

    book = load_presets(args.registry)
    if args.action == "show":
        if not args.name:
            raise VGTError("usage: vgt presets show NAME")
        preset = book.preset(args.name).model_dump(mode="json")
        print(json.dumps(preset, indent=2) if args.json else yaml.safe_dump(preset, sort_keys=False), end="" if not args.json else "\n")
        return
    rows = [{"name": n, "description": book.raw(n).get("description", ""), "source": book.source(n)} for n in book.names()]
    matrices = [
        {"name": n, "base": m.base, "cells": list(m.expand()), "evaluators": [e.name for e in m.evaluators],
         "prepare": m.prepare and m.prepare.name, "description": m.description}
        for n, (m, _) in sorted(book.matrices.items())
    ]  # fmt: skip
    blocks = [{"name": n, "source": source} for n, source in book.blocks().items()]
    if args.json:
        _print_json({"presets": rows, "blocks": blocks, "matrices": matrices})
        return
    for r in rows:
        print(f"{r['name']:22} {r['description']}")
    if blocks:
        print("\nblocks (`use: NAME` in a preset): " + ", ".join(b["name"] for b in blocks))
    if matrices:
        print("\nmatrices:")
        for m in matrices:
            print(f"  {m['name']:20} base {m['base']}, {len(m['cells'])} cells, scored by {'+'.join(m['evaluators'])}: {m['description']}")


# -- VGT-AE -------------------------------------------------------------------------------------------------------


@command("train-ae")
def cmd_train_ae(args: argparse.Namespace) -> None:
    from vgt_core.training.autoencoder import train_autoencoder

    out = train_autoencoder(
        _preset(args), args.out, stage=args.stage, data=args.data, steps=args.steps, init=args.init, resume=args.resume, progress=not args.quiet
    )
    _print_once(f"VGT-AE stage {args.stage} saved to {out}")


@command("eval-recon")
def cmd_eval_recon(args: argparse.Namespace) -> None:
    import torch

    from vgt_core.autoencoder import VGTAutoencoder
    from vgt_core.data import collate, open_dataset
    from vgt_core.latents import process_state
    from vgt_core.metrics import PROTOCOLS, evaluate_reconstruction
    from vgt_core.training.autoencoder import model_folder

    state = process_state()  # one process, or one rank of `accelerate launch`: each scores its share of the images
    ae = VGTAutoencoder.from_pretrained(model_folder(args.model), map_location=state.device)
    protocol = PROTOCOLS[args.protocol].settings(ae.image_size)
    data = open_dataset(args.data, protocol["input_size"])
    if state.num_processes > 1:
        data = torch.utils.data.Subset(data, range(state.process_index, len(data), state.num_processes))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, collate_fn=collate, num_workers=args.num_workers)
    result = evaluate_reconstruction(
        ae, loader, state.device, inception_weights=args.inception_weights, max_images=args.max_images,
        progress=not args.quiet and state.is_main_process, score_size=protocol["score_size"],
    )  # fmt: skip
    result["settings"] = {
        "protocol": protocol, "model": str(Path(args.model).resolve()), "data": str(args.data), "encoder_size": ae.image_size,
        "batch_size": args.batch_size, "max_images_per_process": args.max_images, "processes": state.num_processes,
        "dtype": str(next(iter(ae.parameters()), torch.zeros(())).dtype).removeprefix("torch."), "psnr": "mean of per-image PSNR, [0, 1] images, data_range 1",
        "ssim": "torchmetrics SSIM (Gaussian 11x11, sigma 1.5), [0, 1] images, data_range 1",
        "rfid": "torchmetrics FID on torch-fidelity's InceptionV3 pool3 (2048), weights read as tensors only",
        "inception_weights": str(args.inception_weights) if args.inception_weights else None,
    }  # fmt: skip
    if protocol["paper_input_size"] not in (None, ae.image_size):
        result["settings"]["note"] = (
            f"the paper's numbers fed {protocol['paper_input_size']} px; this encoder takes {ae.image_size} px"
        )
    if not state.is_main_process:
        return
    if args.json:
        _print_json(result)
        return
    print(f"protocol {protocol['name']}: {protocol['input_size']} px in, scored at {protocol['score_size']} px")
    print(f"images {result['n_images']} (skipped unreadable: {result['skipped']})")
    print(f"PSNR {result['psnr']:.2f} dB   SSIM {result['ssim']:.4f}")
    print(f"rFID {result['rfid']:.3f}" if result.get("rfid") is not None else f"rFID skipped: {result.get('rfid_note')}")


# -- VGT-AR -------------------------------------------------------------------------------------------------------


@command("cache-latents")
def cmd_cache_latents(args: argparse.Namespace) -> None:
    from vgt_core.autoencoder import VGTAutoencoder
    from vgt_core.data import open_dataset
    from vgt_core.latents import FORMAT, cache_latents, process_state
    from vgt_core.serialization import check_output
    from vgt_core.training.autoencoder import model_folder

    check_output(Path(args.out), FORMAT, "replace")  # before any work; checked again when the cache is written
    state = process_state()  # one process, or one rank of `accelerate launch` / `torchrun`: each on its own device
    ae = VGTAutoencoder.from_pretrained(model_folder(args.autoencoder), map_location=state.device)
    manifest = cache_latents(
        ae, open_dataset(args.data, ae.image_size), args.out, batch_size=args.batch_size, shard_size=args.shard_size,
        num_workers=args.num_workers, dtype=args.dtype, progress=not args.quiet, source=model_folder(args.autoencoder),
    )  # fmt: skip
    if state.is_main_process:
        print(
            f"cached {manifest['count']} latents of grid {manifest['grid']} ({manifest['dtype']}, {manifest['processes']} "
            f"process{'es' if manifest['processes'] > 1 else ''}) "
            f"to {args.out} (skipped unreadable: {manifest['skipped']})"
        )


@command("train-ar")
def cmd_train_ar(args: argparse.Namespace) -> None:
    from vgt_core.training.autoregressive import train_generator

    out = train_generator(_preset(args), args.autoencoder, args.out, data=args.data, steps=args.steps, resume=args.resume, progress=not args.quiet)
    _print_once(f"VGT model saved to {out}")


def _print_once(text: str) -> None:
    """Print on the main process only: under `accelerate launch` every rank returns from training."""
    from vgt_core.latents import process_state

    if process_state().is_main_process:
        print(text)


@command("generate")
def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from vgt_core.serialization import atomic_folder, check_output

    out = Path(args.out)
    one_file = out.suffix.lower() == ".png"
    if not one_file:
        check_output(out, IMAGES_KIND, "replace")  # before the model loads; checked again when written
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = _load_pipeline(args, device)
    settings = {key: getattr(args, key) for key in (*GENERATION_FLAGS, "seed") if getattr(args, key) is not None}
    from vgt_core.config import GenerationConfig, validate_model

    validate_model(GenerationConfig, {**pipe.defaults.model_dump(), **settings}, "generation settings")  # names the flag's key
    images = pipe(args.prompt, progress=not args.quiet, **settings)
    if one_file:  # one prompt: that file; several: x-0.png, x-1.png, ... beside it
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
        for image, path in zip(images, paths):
            image.save(path)
    else:
        names = [f"{i:04d}.png" for i in range(len(images))]
        with atomic_folder(out, kind=IMAGES_KIND) as tmp:
            for image, name in zip(images, names):
                image.save(tmp / name)
        paths = [out / name for name in names]
    for prompt, path in zip(args.prompt, paths):
        print(f"{path}\t{prompt}")


# -- benchmarks: GenEval, DPG-Bench (vgt_core.benchmarks) ------------------------------------------------------

def _shard(args: argparse.Namespace) -> Any:
    from vgt_core.benchmarks import Shard, parse_shard

    return parse_shard(args.shard) if args.shard else Shard()


def _bench(
    args: argparse.Namespace, kind: str, benchmark: str, prompts: tuple[Path, Any], make_jobs: Callable, images: int, shard: Any
) -> None:
    """The shared part of bench-geneval and bench-dpg: claim this shard of --out, record the settings, generate
    the prompts of this shard that are not done yet. ``prompts``: where they came from, and what was read there."""
    from vgt_core import benchmarks as B
    from vgt_core.config import GenerationConfig, validate_model
    from vgt_core.latents import process_state
    from vgt_core.serialization import check_output

    out = Path(args.out)
    check_output(out, kind, "reuse")  # before the model loads
    state = process_state()  # under `accelerate launch` each rank takes its share of this shard
    shard = shard.split(state.process_index, state.num_processes)
    pipe = _load_pipeline(args, state.device)
    flags = {key: getattr(args, key) for key in GENERATION_FLAGS if getattr(args, key) is not None}
    generation = validate_model(GenerationConfig, {**pipe.defaults.model_dump(), **flags, "seed": None}, "generation settings")
    settings = {
        "benchmark": benchmark, "model": str(Path(args.model).resolve()), "prompts": str(prompts[0].resolve()),
        "prompts_sha256": B.content_sha256(prompts[1]),
        "images_per_prompt": images, "seed": args.seed, "seeds": "prompt k, image j: seed + k * images_per_prompt + j",
        "prompt_rewrite": "none", "dtype": str(pipe.dtype).removeprefix("torch."),
        "generation": generation.model_dump(mode="json", exclude={"seed"}),
    }  # fmt: skip
    if benchmark == "geneval":
        settings["grid"] = args.grid
    with B.claim_folder(out, kind, shard):
        B.record_settings(out, settings)
        jobs = [job for job in make_jobs(out, pipe) if shard.owns(job.index)]
        B.remove_stale_temporaries(out, {job.key for job in jobs})
        counts = B.run_jobs(
            pipe, jobs, images=images, seed=args.seed, settings=settings["generation"], batch_size=args.batch_size,
            progress=not args.quiet, desc=f"{benchmark} {shard}" if shard.count > 1 else benchmark,
        )  # fmt: skip
    where = f" shard {shard}" if shard.count > 1 else ""
    print(f"{benchmark}{where}: generated {counts['generated']} prompts, {counts['skipped']} already done, into {out}")


@command("bench-geneval")
def cmd_bench_geneval(args: argparse.Namespace) -> None:
    from vgt_core import benchmarks as B

    shard = _shard(args)
    metadata = B.read_geneval_metadata(args.metadata)
    jobs = lambda out, pipe: B.geneval_jobs(out, metadata, args.images, args.grid)  # noqa: E731
    _bench(args, B.GENEVAL_KIND, "geneval", (Path(args.metadata), metadata), jobs, args.images, shard)


@command("bench-dpg")
def cmd_bench_dpg(args: argparse.Namespace) -> None:
    from vgt_core import benchmarks as B

    shard = _shard(args)
    prompts = B.read_dpg_prompts(args.prompts)
    jobs = lambda out, pipe: B.dpg_jobs(out, prompts, pipe.autoencoder.image_size)  # noqa: E731 - a tile is one image
    _bench(args, B.DPG_KIND, "dpg", (Path(args.prompts), prompts), jobs, B.DPG_TILES, shard)


@command("bench-summary")
def cmd_bench_summary(args: argparse.Namespace) -> None:
    from vgt_core.benchmarks import format_summary, summarize

    summary = summarize(args.path)
    if args.json:
        _print_json(summary)
        return
    print(format_summary(summary))


# -- ablations ----------------------------------------------------------------------------------------------------


@command("ablate")
def cmd_ablate(args: argparse.Namespace) -> int:
    from vgt_core.ablation import Budget, run_ablation

    budget = Budget.of(args.quick)
    budget = Budget(latent_images=args.latent_images or budget.latent_images, eval_images=args.eval_images or budget.eval_images)
    rows = run_ablation(
        args.matrix, args.out, data=args.data, eval_data=args.eval_data, steps=args.steps, quick=args.quick,
        progress=not args.quiet, registry=args.registry, budget=budget, overrides=_overrides(args.set),
    )  # fmt: skip
    for row in rows:
        if row["status"] == "ok":
            print(f"{row['cell']:24} " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in _scores(row)))
        else:
            print(f"{row['cell']:24} FAILED: {row['error']}")
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"results: {args.out}/results.md" + (f"; {failed} cell(s) failed" if failed else ""))
    return 1 if failed else 0


def _scores(row: dict[str, Any]) -> list[tuple[str, Any]]:
    """A results row's scores (what its evaluators reported), for one line of output."""
    skip = {"cell", "status", "overrides", "error", "tokens_per_step", "ae_train_s", "ar_train_s", "wall_s"}
    return [(k, v) for k, v in row.items() if k not in skip and v != ""]


# -- upstream checkpoints ----------------------------------------------------------------------------------------


@command("convert-upstream")
def cmd_convert_upstream(args: argparse.Namespace) -> None:
    from vgt_adapters.upstream import convert_upstream

    if args.ae is None and args.ar is None:
        raise VGTError("pass --ae (a VGT-AE file), --ar (an AR file, which may hold the VGT-AE too), or both")
    report = convert_upstream(args.preset, args.out, ae=args.ae, ar=args.ar, registry=args.registry, overrides=_overrides(args.set))
    if args.json:
        _print_json(report)
        return
    what = "VGT pipeline (VGTPipeline.from_pretrained)" if report["kind"] == "pipeline" else "VGT-AE (VGTAutoencoder.from_pretrained)"
    print(f"{what} written to {report['out']}")
    print(f"  tensors: autoencoder {report['autoencoder_tensors']}, generator {report['generator_tensors']}")
    if report["ae_overridden_by_ar"]:
        print(f"  the AR file's vgt_ae.* replaced {report['ae_overridden_by_ar']} tensors of --ae ({report['ae_differing_from_ar']} differed)")
    for why, count in report["dropped"].items():
        print(f"  dropped {count}: {why}")


# -- parser -------------------------------------------------------------------------------------------------------


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, else a usage error saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def _seed(text: str) -> int:
    """An argparse type: a seed that torch's generators take, 0 <= seed < 2**64."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {value}")
    return value


def _load_pipeline(args: argparse.Namespace, device: Any) -> Any:
    """The pipeline of ``--model`` on ``device`` in ``--dtype``, compiled with ``--compile`` (the flags of
    ``generation_args``, which every generating command takes)."""
    from vgt_core.pipeline import VGTPipeline

    pipe = VGTPipeline.from_pretrained(args.model, device=device, dtype=args.dtype)
    return pipe.compile() if args.compile else pipe


GENERATION_FLAGS = (
    "tokens_per_step", "guidance_scale", "guidance_schedule", "num_sampling_steps", "solver", "temperature", "order", "cache_implementation",
)  # fmt: skip


def generation_args(p: argparse.ArgumentParser) -> None:
    """The sampler flags of every command that generates (unset: the model folder's generation.json)."""
    p.add_argument("--tokens-per-step", type=int, help="position queries per LM pass (1, 4, 16, ...)")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--guidance-schedule", choices=["constant", "increasing", "decreasing"])
    p.add_argument("--num-sampling-steps", type=int)
    p.add_argument("--solver", choices=["euler", "sde"])
    p.add_argument("--temperature", type=float)
    p.add_argument("--order", choices=["random", "raster"])
    p.add_argument("--cache-implementation", choices=["dynamic", "static"], help="the KV cache: grown each pass, or preallocated and written in place")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="weights and compute dtype (default: bfloat16 on a CUDA GPU that supports it, float32 on CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the language model and the flow head: the first batch compiles (tens of seconds), "
        "pays off over many batches",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgt", description="Visual Generation Tuning: a VLM that generates images")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also: VGT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
        return p

    def preset_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", required=True, help="a preset name (see `vgt presets`)")
        p.add_argument("--registry", action="append", help="an extra registry.yaml (repeatable)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a preset field, e.g. train_ae.stage1.lr=1e-4")

    p = add("plugins", "list every registered component (kind, name, package, version)")
    p.add_argument("--json", action="store_true")

    p = add("presets", "list presets, blocks and ablation matrices, or show one preset as resolved (bases, blocks, defaults)")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p.add_argument("--registry", action="append", help="an extra registry.yaml (repeatable)")

    p = add("train-ae", "train a VGT-AE stage (1: reconstruction + distillation; 2: latent norm + noise)")
    preset_args(p)
    p.add_argument("--data", help="image folder, JSONL of {image, caption}, or tar shards (default: the preset's dataset)")
    p.add_argument("--stage", type=int, choices=[1, 2], default=1)
    p.add_argument("--out", required=True, help=RUN_OUT_HELP)
    p.add_argument("--steps", type=_at_least(1), help="train this many steps instead of the preset's")
    p.add_argument("--init", help="stage 2: the stage-1 run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    p = add("eval-recon", "reconstruction metrics of a VGT-AE: PSNR, SSIM, rFID")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument(
        "--protocol", choices=["native", "imagenet256"], default="native",
        help="native: scored at the encoder's size; imagenet256: the paper's Table 2, scored at 256 (both: the "
        "encoder's size in, 448 for the paper's models, shorter side resized and centre-cropped)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=_at_least(1), default=16, help="images per batch, per process")
    p.add_argument("--num-workers", type=_at_least(0), default=0, help="DataLoader workers decoding images, per process")
    p.add_argument("--max-images", type=_at_least(1), help="score at most this many images (per process)")
    p.add_argument("--inception-weights", help="local pt_inception-2015-12-05 weights for rFID")
    p.add_argument("--json", action="store_true", help="print the metrics and every setting as JSON")

    p = add("cache-latents", "pre-compute VGT-AE latents for AR training")
    p.add_argument("--autoencoder", required=True)
    p.add_argument("--data", required=True)
    p.add_argument(
        "--out", required=True,
        help="a new or empty folder, or an earlier latent cache holding only its own files: that one is replaced, "
        "once the new cache is complete; any other folder is refused",
    )
    p.add_argument("--batch-size", type=_at_least(1), default=32, help="images per encoder call, per process")
    p.add_argument("--shard-size", type=_at_least(1), default=4096, help="latents per safetensors shard")
    p.add_argument("--num-workers", type=_at_least(0), default=0, help="DataLoader workers decoding images, per process")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="how latents are stored")

    p = add("train-ar", "train the generator (QueryAR or MAR on the VLM's language model)")
    preset_args(p)
    p.add_argument("--autoencoder", required=True, help="a VGT-AE folder (or train-ae run folder)")
    p.add_argument("--data", help="images with captions, or a latent cache (default: the preset's dataset)")
    p.add_argument("--out", required=True, help=RUN_OUT_HELP)
    p.add_argument("--steps", type=_at_least(1), help="train this many steps instead of the preset's")
    p.add_argument("--resume", action="store_true")

    p = add("generate", "generate images from prompts with a trained model")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", required=True, help="repeatable")
    p.add_argument(
        "--out", required=True,
        help="a .png (several prompts: NAME-0.png, NAME-1.png, ...; existing files are overwritten), else a folder "
        "(0000.png, ...): new, empty, or an earlier `vgt generate` folder holding only its images, which is replaced; "
        "any other folder is refused",
    )
    generation_args(p)
    p.add_argument("--seed", type=_seed, help="image i uses seed + i, alone or in a batch (0 <= seed < 2**64)")

    def bench_args(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--model", required=True, help="a pipeline folder (or train-ar run folder)")
        p.add_argument(
            "--out", required=True,
            help=f"a new or empty folder, or an earlier {what} folder of vgt's, which is continued (finished prompts are "
            "skipped); any other folder is refused",
        )  # fmt: skip
        p.add_argument("--shard", metavar="I/N", help="generate only prompts k with k %% N == I (under accelerate launch, "
                       "each process takes its share of that)")  # fmt: skip
        p.add_argument("--batch-size", type=_at_least(1), default=16, help="images per generator call")
        p.add_argument("--seed", type=_seed, default=0, help="image j of prompt k uses seed + k * images + j")
        generation_args(p)

    p = add("bench-geneval", "generate GenEval's image folder (score it with GenEval's evaluate_images.py)")
    p.add_argument("--metadata", required=True, help="GenEval's prompts/evaluation_metadata.jsonl")
    p.add_argument("--images", type=_at_least(1), default=4, help="samples per prompt (GenEval: 4)")
    p.add_argument("--grid", action="store_true", help="also write each prompt's grid.png")
    bench_args(p, "bench-geneval")

    p = add("bench-dpg", "generate DPG-Bench's images: one 2x2 grid per prompt (score with PIC_NUM=4)")
    p.add_argument("--prompts", required=True, help="DPG-Bench's dpg_bench/prompts folder of <id>.txt")
    bench_args(p, "bench-dpg")

    p = add("bench-summary", "the paper's table from GenEval's / DPG-Bench's result files")
    p.add_argument("path", help="a results file, or a folder searched for them")
    p.add_argument("--json", action="store_true")

    p = add("ablate", "run an ablation matrix of registry.yaml: every cell trained, scored and tabulated (results.md)")
    p.add_argument("--matrix", required=True, help="a matrix name (see `vgt presets`)")
    p.add_argument(
        "--out", required=True,
        help="folder for every cell, the shared artefacts and results.*: new, empty, or an earlier ablation's "
        "(its finished cells are reused); any other folder is refused",
    )
    p.add_argument("--data", help="training images: folder, JSONL or tar shards (default: the base preset's dataset)")
    p.add_argument(
        "--eval-data",
        help="held-out images the evaluators score (default: the last --eval-images of the training data, held out of training)",
    )
    p.add_argument("--eval-images", type=_at_least(1), help="images held out of the training data (default 512; --quick 64)")
    p.add_argument("--latent-images", type=_at_least(1), help="training images cached for AR training (default 16384; --quick 2048)")
    p.add_argument("--steps", type=_at_least(1), help="cap the training steps of every phase (smoke runs)")
    p.add_argument("--quick", action="store_true", help="smoke budgets: the evaluators', the preparation's and the above")
    p.add_argument("--registry", action="append", help="an extra registry.yaml (repeatable)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of every cell (the cell's own overrides win)")

    p = add("convert-upstream", "convert released upstream VGT checkpoints (hustvl/VGT .pth) into a vgt folder")
    preset_args(p)
    p.add_argument("--ae", help="upstream VGT-AE file (.pth/.pt/.bin or .safetensors); optional when --ar holds vgt_ae.*")
    p.add_argument("--ar", help="upstream AR checkpoint (mmengine: its ema_state_dict is preferred); its vgt_ae.* override --ae")
    p.add_argument(
        "--out", required=True,
        help="a pipeline folder (with --ar) or a VGT-AE folder (--ae only): new, empty, or an earlier conversion of "
        "the same kind holding only its own files, which is replaced; any other folder is refused",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    from vgt_core.plugins import plugin_manager  # plugins may add commands of their own (see hookspecs)

    plugin_manager().hook.vgt_add_commands(subparsers=sub, command=command)
    return parser


# Commands that load no model: --quiet must not import transformers and diffusers (seconds) just to silence them.
MODEL_FREE_COMMANDS = {"plugins", "presets", "bench-summary"}


def _silence_library_progress_bars(command: str) -> None:
    """--quiet means no bars at all, the weight-loading bars of transformers and diffusers included."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # the hub's downloads; transformers reads it when imported
    if command in MODEL_FREE_COMMANDS:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises: vgt's own errors, bad values (pydantic, JSON, data checks), files (missing, existing,
    unreadable) and damaged safetensors. Anything else is a bug and keeps its traceback."""
    from safetensors import SafetensorError

    return (VGTError, ValueError, OSError, SafetensorError)


def _debug(argv: list[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("VGT_DEBUG", "") not in ("", "0")


def _command_name(argv: list[str] | None) -> str:
    """The sub-command named on the command line, for errors raised before parsing finished (plugin loading)."""
    names = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return names[0] if names else ""


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input ends as ``vgt CMD: error: MESSAGE`` and exit status 2, without a traceback
    unless ``--debug`` or ``VGT_DEBUG=1``."""
    debug = _debug(argv)
    name = _command_name(argv)
    try:
        parser = build_parser()  # loads plugins (VGT_LOAD_PLUGINS may name one that does not exist)
    except _user_errors() as exc:
        if debug:
            raise
        print(f"vgt {name}: error: {_one_line(exc)}".replace("vgt : ", "vgt: "), file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        _silence_library_progress_bars(args.command)
    if args.command not in MODEL_FREE_COMMANDS:
        import torch  # not vgt_core.training.run's flush_denormals (the why): importing accelerate costs ~1.5 s

        torch.set_flush_denormal(True)  # before torch starts its threads, which copy the flag
    try:
        return COMMANDS[args.command](args) or 0
    except _user_errors() as exc:
        if debug or args.debug:
            raise
        print(f"vgt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug or args.debug or not _compile_failed(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"vgt {args.command}: error: torch.compile could not build its kernels here ({first}); run without "
              "--compile / train_ar.compile, or with --debug for the traceback", file=sys.stderr)
        return 2


def _compile_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is torch.compile's backend failing to build (no C++ compiler, no Triton, ...): a property of the
    machine that --compile / train_ar.compile asked for, not a bug of the model."""
    dynamo = sys.modules.get("torch._dynamo.exc")
    return dynamo is not None and isinstance(exc, dynamo.BackendCompilerFailed)


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; a pydantic error as vgt's ``key: what is wrong`` lines, joined into one line."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from vgt_core.config import format_validation_error

        text = format_validation_error(exc, None, exc.title)
    else:
        text = str(exc) or type(exc).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
