"""VGT-AR training: the VLM's language model learns to predict VGT-AE latents (paper §3.3, §4.1).

Latents come from a latent cache (``vgt cache-latents``) or are encoded on the fly by the frozen VGT-AE.
The result is a pipeline folder (``OUT/model``: autoencoder + generator + default generation settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torchvision.utils import save_image

from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.compose import build_generator
from vgt_core.config import Preset
from vgt_core.data import check_trainable, collate as image_collate, open_dataset
from vgt_core.generator import VGTGenerator
from vgt_core.latents import LatentDataset, check_cache_source, collate_latents, is_latent_cache
from vgt_core.errors import VGTError
from vgt_core.pipeline import VGTPipeline
from vgt_core.repa import build_repa_teacher, repa_targets
from vgt_core.training.autoencoder import _named_dataset, model_folder
from vgt_core.training.muon import hidden_matrices
from vgt_core.checkpointing import enable_gradient_checkpointing
from vgt_core.training.run import ScheduledEMA, TrainingRun, cosine_with_warmup, optimizer_groups


def train_generator(
    preset: Preset,
    autoencoder: str | Path,
    out_dir: str | Path,
    *,
    data: Any = None,
    steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train the generator of ``preset`` on latents of ``autoencoder``; returns ``OUT/model``. Runs on every process
    of an ``accelerate launch``; the result does not depend on how many share the global batch."""
    if steps is not None and steps < 1:
        raise VGTError(f"steps must be at least 1, got {steps}")
    cfg = preset.train_ar if steps is None else preset.train_ar.model_copy(update={"steps": steps})
    preset = preset.model_copy(update={"train_ar": cfg})  # OUT/preset.json records the steps the run takes
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    run = TrainingRun(
        out_dir,
        precision=cfg.mixed_precision,
        resume=resume,
        progress=progress,
        preset=preset.model_dump(mode="json"),
        batch_size=cfg.batch_size,
        accumulation=cfg.gradient_accumulation_steps,
    )
    ae_folder = model_folder(autoencoder)
    ae = VGTAutoencoder.from_pretrained(ae_folder).requires_grad_(False).eval()

    cached = is_latent_cache(data)
    if cached:
        dataset, collate = LatentDataset(data), collate_latents
        if tuple(dataset.manifest["grid"]) != tuple(ae.grid) or dataset.manifest["channels"] != ae.latent_channels:
            raise ValueError(f"{data}: latents of grid {dataset.manifest['grid']} do not match the autoencoder's {list(ae.grid)}")
        check_cache_source(dataset.manifest, ae_folder, data)
    else:
        source = data if data is not None else _named_dataset(preset)
        dataset, collate = open_dataset(source, ae.image_size, streaming=cfg.streaming), image_collate
    check_trainable(dataset, cfg.batch_size, "train_ar.batch_size")  # before the models are built

    gen = build_generator(preset, ae)
    check_grid = getattr(gen.sampler, "check_grid", None)  # e.g. QueryAR's train_group_sizes must divide the tokens
    if check_grid is not None:
        sample = preset.generation.model_copy(update=cfg.sample_generation)
        check_grid(tuple(ae.grid), {"generation.tokens_per_step": preset.generation, "train_ar.sample_generation": sample})
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(gen.backbone)

    teacher = build_repa_teacher(cfg, preset.generator)  # None unless train_ar.repa_weight > 0; checks repa_dim
    if teacher is not None and cached:
        raise VGTError(
            f"{data}: train_ar.repa_weight > 0 needs the training images (the REPA teacher reads them) and a latent "
            "cache holds none: pass the images as --data, or set train_ar.repa_weight=0"
        )

    if teacher is None and gen.head.repa_projector is not None:
        gen.head.repa_projector.requires_grad_(False)  # unused without REPA: no update, no data-parallel stall
    if cfg.optimizer == "muon":  # the flow head's last layer is an output layer: AdamW keeps it
        hidden = hidden_matrices(gen, outputs=gen.output_layers)
        optimizer = run.muon(
            gen.named_parameters(), hidden, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, key="train_ar.optimizer"
        )
    else:
        optimizer = run.adamw(optimizer_groups(gen.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)
    schedule = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps, cfg.end_lr / cfg.lr)
    acc = run.accelerator
    gen, optimizer = acc.prepare(gen, optimizer)
    raw = acc.unwrap_model(gen)
    if cfg.compile:
        raw.compile()  # its parts, inside any data-parallel wrapper: the wrapper's hooks stay eager
    ae.to(acc.device)
    if teacher is not None:
        teacher.to(acc.device)  # frozen, outside prepare: no gradients, no sync, not in checkpoints
    run.check_ema(cfg.ema_decay, "train_ar.ema_decay")
    ema = ScheduledEMA(raw.parameters(), decay=cfg.ema_decay, start=cfg.ema_start, warmup=cfg.ema_warmup) if cfg.ema_decay else None
    state = run.load_latest() if resume else None
    start = 0
    if state is not None:
        start = state["step"]
        schedule.load_state_dict(state["schedule"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    if ema is not None:
        ema.to(acc.device)
    loader = run.loader(dataset, cfg.batch_size, cfg.seed, start, num_workers=cfg.num_workers, collate_fn=collate)
    params, raw_params = list(gen.parameters()), list(raw.parameters())  # once: walking the modules costs per step

    gen.train()
    for step, parts in run.batches(loader, start, cfg.steps, "VGT-AR"):
        scalars: dict[str, torch.Tensor] = {}
        for part in run.micro_steps(gen, parts):
            draws = run.draws(cfg.seed, step, part["positions"])
            features = None
            with torch.no_grad():
                if cached:
                    latents = part["latents"].to(acc.device)
                else:
                    images = part["images"].to(acc.device)
                    latents = ae.encode(images)
                    if teacher is not None:
                        features = repa_targets(teacher, images, tuple(latents.shape[-2:]))
            uncond = draws.rand(draws.per_sample(len(part["captions"]))) < cfg.prompt_dropout
            with acc.autocast():
                if features is None:
                    losses = {"loss": gen(latents, part["captions"], uncond, draws=draws)}
                else:
                    flow, repa = gen(latents, part["captions"], uncond, repa_features=features, draws=draws)
                    losses = {"loss": flow + cfg.repa_weight * repa, "flow": flow, "repa": repa}
            acc.backward(losses["loss"] / len(parts))
            for k, v in losses.items():
                scalars[k] = scalars.get(k, 0.0) + v.detach() / len(parts)
        scalars = run.averaged(scalars)
        run.stop_if_not_finite(step, scalars)  # on every process together, before the optimizer uses it
        if cfg.grad_clip:
            run.clip_gradients(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(raw_params)

        run.advance(scalars)
        if step % cfg.log_every == 0 or step == cfg.steps:
            run.log(step, {**scalars, "lr": schedule.get_last_lr()[0], "skipped_images": run.skipped})
        if cfg.sample_count and (step % cfg.sample_every == 0 or step == cfg.steps):
            _save_samples(run, step, raw, ae, parts[0]["captions"], preset, cfg)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            train_state = {"schedule": schedule.state_dict()}
            if ema is not None:
                train_state["ema"] = ema.state_dict()
            run.save_checkpoint(step, train_state, cfg.keep_checkpoints)

    if ema is not None:
        ema.copy_to(raw.parameters())
    raw.eval()
    weights = run.full_state_dict(gen)
    if acc.is_main_process:
        VGTPipeline(ae, raw, preset.generation).save_pretrained(run.out / "model", generator_state=weights)
    acc.wait_for_everyone()
    run.finish()
    return run.out / "model"


@torch.no_grad()
def _save_samples(run: TrainingRun, step: int, gen: VGTGenerator, ae: VGTAutoencoder, captions: list[str], preset: Preset, cfg) -> None:
    """Every process draws ``sample_count / processes`` of its own batch's captions (all take part, as FSDP needs);
    the main process saves the grid of all. The settings are the model's generation defaults with
    ``cfg.sample_generation``."""
    acc = run.accelerator
    per = -(-cfg.sample_count // run.world)
    mine = (captions * per)[:per]  # repeated if this process's batch holds fewer
    was_training = gen.training
    gen.eval()
    settings = preset.generation.model_copy(update={**cfg.sample_generation, "seed": step * run.world * per + run.rank * per})
    latents = gen.generate(mine, ae.grid, settings)
    gen.train(was_training)
    images = ae.decode(latents.to(next(ae.parameters()).dtype)).clamp(-1, 1).float().contiguous()
    shown = mine
    if run.world > 1:
        images, shown = acc.gather(images), gather_object(mine)
    if not acc.is_main_process:
        return
    count = min(cfg.sample_count, len(shown))
    folder = run.out / "samples"
    folder.mkdir(exist_ok=True)
    save_image((images[:count].cpu() + 1) / 2, folder / f"step-{step:08d}.png", nrow=min(4, count))
    (folder / f"step-{step:08d}.txt").write_text("\n".join(shown[:count]) + "\n")
