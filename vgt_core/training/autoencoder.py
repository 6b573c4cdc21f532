"""VGT-AE training, both stages (paper §3.2; upstream's recipe, with its deviations named in config).

Stage 1: MSE + perceptual (LPIPS + ConvNeXt) + GAN (hinge, fixed weight, after ``gan_start``; the discriminator
regularised by LeCam) + distill * MSE(E(x), E_teacher(x)), the teacher being a frozen copy of the encoder as it
was when stage 1 began. The MSE and the discriminator see images in ``loss_range`` ([0, 1] as upstream).
Stage 2 (``--init`` a stage-1 run): latent normalisation + noise; the same losses with the stage-2 weights.
The encoder learns at ``encoder_lr_mult`` x the LR; 0 freezes it (the paper), 0.5 is the released code.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.compose import build_autoencoder
from vgt_core.config import AEStage, Preset
from vgt_core.data import check_trainable, open_dataset
from vgt_core.errors import VGTError
from vgt_core.losses import Discriminator, LeCam, PerceptualLoss, hinge_d_loss, hinge_g_loss, to_loss_range
from vgt_core.serialization import load_weights, save_weights
from vgt_core.checkpointing import enable_gradient_checkpointing
from vgt_core.training.run import (
    ScheduledEMA,
    TrainingRun,
    cosine_with_warmup,
    optimizer_groups,
)

TEACHER = "teacher.safetensors"


def model_folder(path: str | Path) -> Path:
    """Accept a run folder (``OUT``) or the model folder inside it (``OUT/model``)."""
    path = Path(path)
    return path / "model" if (path / "model" / "config.json").exists() else path


def train_autoencoder(
    preset: Preset,
    out_dir: str | Path,
    *,
    stage: int = 1,
    data: Any = None,
    steps: int | None = None,
    init: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Train one VGT-AE stage; returns the folder of the trained model (``OUT/model``)."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    cfg: AEStage | None = preset.train_ae.stage1 if stage == 1 else preset.train_ae.stage2
    if cfg is None:
        raise ValueError("this preset has no stage 2 (train_ae.stage2 is null): its stage-1 model is the final VGT-AE")
    if steps is not None:
        if steps < 1:
            raise VGTError(f"steps must be at least 1, got {steps}")
        cfg = cfg.model_copy(update={"steps": steps})
        # OUT/preset.json records the steps the run takes
        preset = preset.model_copy(update={"train_ae": preset.train_ae.model_copy(update={f"stage{stage}": cfg})})
    if init is not None and cfg.distill_weight > 0 and find_teacher(init) is None:
        raise VGTError(missing_teacher_message(init, stage))  # before anything is written
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

    # -- model, teacher ----------------------------------------------------------------------------------------
    # The teacher is the encoder as it was before any VGT-AE training: saved by stage 1, passed on by --init.
    if init is not None:
        ae = VGTAutoencoder.from_pretrained(model_folder(init))
        teacher_file = find_teacher(init)
    elif stage == 2:
        raise ValueError("stage 2 starts from a stage-1 run: pass init=<stage-1 output folder>")
    else:
        ae = build_autoencoder(preset)
        teacher_file = None  # the encoder as built is the teacher
    ae.set_latent_regularization(cfg.latent_norm, cfg.noise_sigma)
    if resume and (run.out / TEACHER).exists():
        teacher_file = run.out / TEACHER
    teacher = None  # stays None only for an --init without a teacher at distill_weight 0: none is used or passed on
    if teacher_file is not None or init is None:
        teacher = copy.deepcopy(ae.encoder)
        if teacher_file is not None:
            load_weights(teacher, teacher_file)
        teacher.requires_grad_(False).eval()
        if run.accelerator.is_main_process and teacher_file != run.out / TEACHER:
            save_weights(teacher, run.out / TEACHER)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(ae)

    # -- optimisation ------------------------------------------------------------------------------------------
    if cfg.encoder_lr_mult == 0:
        ae.encoder.requires_grad_(False)  # frozen: not even weight decay may touch it
    encoder_ids = {id(p) for p in ae.encoder.parameters()}
    groups = optimizer_groups(((n, p) for n, p in ae.named_parameters() if id(p) not in encoder_ids), cfg.weight_decay)
    for group in optimizer_groups(ae.encoder.named_parameters(), cfg.weight_decay):
        groups.append({**group, "lr": cfg.lr * cfg.encoder_lr_mult})
    optimizer = run.adamw(groups, lr=cfg.lr, betas=cfg.betas)
    schedule = cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.steps, cfg.end_lr / cfg.lr)
    gan_start = cfg.gan_start_step  # an absolute step, or the fraction of (the possibly overridden) cfg.steps
    use_gan = cfg.gan_weight > 0
    disc = Discriminator(cfg.disc_channels, layout=cfg.disc_layout) if use_gan else None
    # biases and norms are not decayed, as upstream's discriminator optimizer
    disc_opt = run.adamw(optimizer_groups(disc.named_parameters(), cfg.weight_decay), lr=cfg.lr, betas=cfg.betas) if use_gan else None
    # the discriminator's schedule starts when it does, after gan_start, and spans the steps left
    disc_schedule = cosine_with_warmup(disc_opt, cfg.warmup_steps, cfg.steps - gan_start, cfg.end_lr / cfg.lr) if use_gan else None
    lecam = LeCam() if use_gan and cfg.lecam_weight > 0 else None
    perceptual = PerceptualLoss.for_stage(cfg)
    source = data if data is not None else _named_dataset(preset)
    dataset = open_dataset(source, ae.image_size, random_flip=cfg.random_flip, crop=cfg.crop, streaming=cfg.streaming)
    check_trainable(dataset, cfg.batch_size, f"train_ae.stage{stage}.batch_size")

    acc = run.accelerator
    ae, optimizer = acc.prepare(ae, optimizer)
    if use_gan:
        disc, disc_opt = acc.prepare(disc, disc_opt)
    raw = acc.unwrap_model(ae)
    raw_disc = acc.unwrap_model(disc) if use_gan else None  # the generator's GAN term: no gradient sync needed
    for frozen in (teacher, perceptual, lecam):
        if frozen is not None:
            frozen.to(acc.device)
    run.check_ema(cfg.ema_decay, f"train_ae.stage{stage}.ema_decay")
    ema = ScheduledEMA(raw.parameters(), decay=cfg.ema_decay, start=cfg.ema_start, warmup=cfg.ema_warmup) if cfg.ema_decay else None
    state = run.load_latest() if resume else None
    start = 0
    if state is not None:
        start = state["step"]
        schedule.load_state_dict(state["schedule"])
        if use_gan:
            disc_schedule.load_state_dict(state["disc_schedule"])
        if lecam is not None:
            lecam.load_state_dict(state["lecam"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
    if ema is not None:
        ema.to(acc.device)
    loader = run.loader(dataset, cfg.batch_size, cfg.seed, start, num_workers=cfg.num_workers)
    # once: walking the modules costs per step
    params, raw_params = list(ae.parameters()), list(raw.parameters())
    disc_params = list(disc.parameters()) if use_gan else []

    # -- loop --------------------------------------------------------------------------------------------------
    ae.train()
    for step, parts in run.batches(loader, start, cfg.steps, f"VGT-AE stage {stage}"):
        gan_on = use_gan and step > gan_start
        scalars: dict[str, torch.Tensor] = {}
        fakes = []
        for part in run.micro_steps(ae, parts):
            images = part["images"].to(acc.device)
            with acc.autocast():
                out = ae(images, draws=run.draws(cfg.seed, step, part["positions"]))
                recon = out["reconstruction"]
                if cfg.distill_weight > 0:
                    with torch.no_grad():
                        target = teacher(images)
            # The image losses in full precision, as upstream's loss module (autocast off).
            with torch.autocast(acc.device.type, enabled=False):
                real_in, fake_in = to_loss_range(images.float(), cfg.loss_range), to_loss_range(recon.float(), cfg.loss_range)
                losses = {"mse": F.mse_loss(fake_in, real_in)}
                total = cfg.mse_weight * losses["mse"]
                if perceptual is not None:
                    losses.update(perceptual(recon, images))
                    total = total + cfg.perceptual_weight * losses["perceptual"]
                if cfg.distill_weight > 0:
                    losses["distill"] = F.mse_loss(out["features"].float(), target.float())
                    total = total + cfg.distill_weight * losses["distill"]
                if gan_on:
                    raw_disc.requires_grad_(False)
                    losses["gan_g"] = hinge_g_loss(raw_disc(fake_in))
                    total = total + cfg.gan_weight * losses["gan_g"]
            acc.backward(total / len(parts))
            losses["loss"] = total
            fakes.append((real_in, fake_in.detach()))
            for k, v in losses.items():
                scalars[k] = scalars.get(k, 0.0) + v.detach() / len(parts)
        scalars = run.averaged(scalars)
        run.stop_if_not_finite(step, scalars)  # on every process together, before the optimizer uses it
        if cfg.grad_clip:
            run.clip_gradients(params, cfg.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

        if gan_on:
            raw_disc.requires_grad_(True)
            d_scalars: dict[str, torch.Tensor] = {}
            for real_in, fake_in in run.micro_steps(disc, fakes):
                with torch.autocast(acc.device.type, enabled=False):
                    # one pass over real and fake: a module wrapped for data parallelism is called once per backward
                    logits = disc(torch.cat([real_in, fake_in]))
                    real, fake = logits[: len(real_in)], logits[len(real_in) :]
                    d_losses = {"gan_d": hinge_d_loss(real, fake)}
                    d_total = d_losses["gan_d"]
                    if lecam is not None:
                        d_losses["lecam"] = lecam(real, fake, reduce=run.mean_tensor)
                        d_total = d_total + cfg.lecam_weight * d_losses["lecam"]
                acc.backward(d_total / len(fakes))
                for k, v in d_losses.items():
                    d_scalars[k] = d_scalars.get(k, 0.0) + v.detach() / len(fakes)
            d_scalars = run.averaged(d_scalars)
            run.stop_if_not_finite(step, d_scalars)
            scalars.update(d_scalars)
            if cfg.grad_clip:
                run.clip_gradients(disc_params, cfg.grad_clip)
            disc_opt.step()
            disc_schedule.step()
            disc_opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(raw_params)

        run.advance(scalars)
        if step % cfg.log_every == 0 or step == cfg.steps:
            run.log(step, {**scalars, "lr": schedule.get_last_lr()[0], "skipped_images": run.skipped})
        if step % cfg.sample_every == 0 or step == cfg.steps:
            _save_grid(run, step, images, recon)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            train_state = {
                "schedule": schedule.state_dict(),
                **({"ema": ema.state_dict()} if ema is not None else {}),
                **({"disc_schedule": disc_schedule.state_dict()} if use_gan else {}),
                **({"lecam": lecam.state_dict()} if lecam is not None else {}),
            }
            run.save_checkpoint(step, train_state, cfg.keep_checkpoints)

    # -- export ------------------------------------------------------------------------------------------------
    if ema is not None:
        ema.copy_to(raw.parameters())
    raw.eval()
    weights = run.full_state_dict(ae)
    if acc.is_main_process:
        raw.save_pretrained(run.out / "model", state=weights)
    acc.wait_for_everyone()
    if run.skipped:
        print(f"VGT-AE stage {stage}: skipped {run.skipped} unreadable images")
    run.finish()
    return run.out / "model"


def find_teacher(init: str | Path) -> Path | None:
    """The stage-1 teacher next to an ``--init`` run: ``RUN/teacher.safetensors`` (``init`` may be ``RUN`` or
    ``RUN/model``)."""
    init = Path(init)
    for folder in (init, model_folder(init).parent):
        if (folder / TEACHER).is_file():
            return folder / TEACHER
    return None


def missing_teacher_message(init: str | Path, stage: int) -> str:
    return (
        f"--init {init}: no {TEACHER} in {Path(init)} (nor next to its model folder). Stage {stage} distils the "
        "encoder towards the self-distillation teacher -- the encoder as it was before stage 1 -- which stage 1 "
        f"saves as RUN/{TEACHER}. Pass the stage-1 run folder as --init, copy its {TEACHER} into {Path(init)}, "
        f"or set train_ae.stage{stage}.distill_weight=0 to train without distillation."
    )


def _named_dataset(preset: Preset) -> Any:
    if preset.dataset is None:
        raise ValueError("no training data: pass --data PATH or give the preset a `dataset`")
    from vgt_core.plugins import registry

    return registry().build("dataset", preset.dataset.name, preset.dataset.options)


@torch.no_grad()
def _save_grid(run: TrainingRun, step: int, images: torch.Tensor, recon: torch.Tensor, n: int = 8) -> None:
    """Originals on top, reconstructions below."""
    if not run.accelerator.is_main_process:
        return
    folder = run.out / "samples"
    folder.mkdir(exist_ok=True)
    grid = torch.cat([images[:n], recon[:n].clamp(-1, 1)]).float().cpu()
    save_image((grid + 1) / 2, folder / f"step-{step:08d}.png", nrow=min(n, images.shape[0]))
