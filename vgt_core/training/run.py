"""Plumbing every training loop shares: output folder, accelerate, optimizer and schedule, checkpoints that
are written atomically and resumed exactly, scalar logs (tensorboard + JSONL), progress bar.

Layout of a run folder::

    OUT/preset.json            the resolved preset the run used
    OUT/log.jsonl              one JSON object of scalars per logged step
    OUT/tb/                    tensorboard event files
    OUT/samples/step-N.png     image grids at intervals
    OUT/checkpoints/step-N/    weights (safetensors) + optimizer/EMA/RNG/data position (safetensors + JSON)
    OUT/model/                 the final model folder (from_pretrained)
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from vgt_core.errors import VGTError
from vgt_core.serialization import RUN_KIND, atomic_folder, load_tree, load_weights, prepare_output, save_tree, save_weights, write_json

CHECKPOINTS = "checkpoints"


def mixed_precision(setting: str) -> str:
    """``auto`` is bf16 on a GPU that supports it and full precision elsewhere (CPU)."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``floor`` x the base LR of each parameter group."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Turn on activation checkpointing in every transformers/diffusers part that supports it."""
    for sub in module.modules():
        if hasattr(sub, "gradient_checkpointing_enable") and getattr(sub, "supports_gradient_checkpointing", False):
            sub.gradient_checkpointing_enable()
        elif hasattr(sub, "gradient_checkpointing") and isinstance(sub.gradient_checkpointing, bool):
            sub.gradient_checkpointing = True


class TrainingRun:
    """One training run in ``out_dir``: refuses to overwrite a run unless asked to resume it."""

    def __init__(self, out_dir: str | Path, *, precision: str, resume: bool, progress: bool, preset: dict | None):
        self.out = Path(out_dir)
        self.accelerator = Accelerator(mixed_precision=mixed_precision(precision), log_with="tensorboard", project_dir=str(self.out))
        # New, empty or an earlier run's folder only; the main process locks it for the run (released in finish).
        self.claim = prepare_output(self.out, RUN_KIND, "reuse", main_process=self.accelerator.is_main_process)
        if self.checkpoints() and not resume:
            self.claim.release()
            raise VGTError(f"{self.out} already holds checkpoints of a run: pass --resume to continue it, or a new --out")
        self.accelerator.init_trackers("tb")
        self.device = self.accelerator.device
        self.show_progress = progress and self.accelerator.is_main_process
        self.bar: tqdm | None = None
        self.skipped = 0  # unreadable images met so far, across resumes (it travels in the checkpoints)
        if preset is not None and self.accelerator.is_main_process:
            write_json(self.out / "preset.json", preset)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        folder = self.out / CHECKPOINTS
        found = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name)] if folder.exists() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, step: int, modules: dict[str, nn.Module], state: dict[str, Any], keep: int) -> None:
        """Weights of ``modules`` as safetensors, ``state`` (optimizers, EMA, data position...) as a tree, plus
        the RNG state, in one atomic folder; older checkpoints beyond ``keep`` are removed."""
        if not self.accelerator.is_main_process:
            return
        with atomic_folder(self.out / CHECKPOINTS / f"step-{step:08d}") as tmp:
            for name, module in modules.items():
                save_weights(self.accelerator.unwrap_model(module), tmp / f"{name}.safetensors")
            save_tree({"step": step, "rng": rng_state(), "skipped": self.skipped, **state}, tmp, "state")
        for old in self.checkpoints()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_latest(self, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
        """Restore the newest checkpoint into ``modules``; return its state (None if there is none)."""
        found = self.checkpoints()
        if not found:
            return None
        for name, module in modules.items():
            load_weights(self.accelerator.unwrap_model(module), found[-1] / f"{name}.safetensors")
        state = load_tree(found[-1], "state")
        set_rng_state(state.pop("rng"))
        self.skipped = state.pop("skipped", 0)
        self._truncate_log(state["step"])
        return state

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again)."""
        path = self.out / "log.jsonl"
        if path.exists() and self.accelerator.is_main_process:
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in kept))

    # -- logs ---------------------------------------------------------------------------------------------------

    def batches(self, loader: Iterable[dict[str, Any]], start: int, total: int, desc: str) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(step, batch)`` for steps ``start + 1 .. total``, the progress bar running. Unreadable images are
        counted in ``skipped``; a batch they left empty is passed over, its step spent as in an uninterrupted run."""
        self.start_progress(total, start, desc)
        batches = iter(loader)
        for step in range(start + 1, total + 1):
            batch = next(batches)
            self.skipped += batch["skipped"]
            if len(batch["captions"]) == 0:
                continue  # nothing readable to learn from; the count above keeps the loss of data visible
            yield step, batch

    def start_progress(self, total: int, initial: int, desc: str) -> None:
        if self.show_progress:
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def advance(self, scalars: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if scalars:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.accelerator.log(scalars, step=step)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.accelerator.end_training()
        self.claim.release()


def optimizer_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay only matrices (>= 2 dims), as upstream's AdamW does; biases, norms and embeddings' 1-d
    parameters are not decayed."""
    decay, no_decay = [], []
    for _, p in named:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


def log_file(out_dir: str | Path) -> list[dict]:
    """The scalars a run logged (for curves and tests)."""
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
