"""Plumbing every training loop shares: output folder, accelerate, optimizer and schedule, checkpoints that
are written atomically and resumed exactly, scalar logs (tensorboard + JSONL), progress bar.

Layout of a run folder::

    OUT/preset.json            the resolved preset the run used
    OUT/log.jsonl              one JSON object of scalars per logged step
    OUT/tb/                    tensorboard event files
    OUT/samples/step-N.png     image grids at intervals
    OUT/checkpoints/step-N/    accelerate's save_state (weights as safetensors, optimizer states, RNG) + state.json /
                               state.safetensors (step, schedules, EMA, counters); the data position is the step
    OUT/model/                 the final model folder (from_pretrained)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from vgt_core.data import ShardSource, make_loader
from vgt_core.errors import VGTError
from vgt_core.randomness import SampleDraws
from vgt_core.serialization import RUN_KIND, load_tree, prepare_output, save_tree, write_json
from vgt_core.streaming import StreamLoader

CHECKPOINTS = "checkpoints"


def mixed_precision(setting: str) -> str:
    """``auto`` is bf16 on a GPU that supports it and full precision elsewhere (CPU)."""
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def flush_denormals() -> None:
    """Read and write denormal floats (below 1.2e-38) as zero on the CPU, as GPUs do.

    SiLU's gradient for very negative inputs is denormal, and x86 cores take a slow path on each one: a shapes-demo
    VGT-AE step ran 2.4x slower (docs/benchmarks.md). The flag (FTZ/DAZ) belongs to a thread, and the intra-op
    threads copy it when torch starts them, at its first parallel op: so the CLI sets it before any command
    runs, and ``TrainingRun`` calls this again, which covers a Python caller's main thread (the worker threads only if no
    parallel op has run yet; call this first to be sure)."""
    torch.set_flush_denormal(True)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to ``floor`` x the base LR of each parameter group."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class ScheduledEMA(EMAModel):
    """diffusers' EMA with upstream's schedule as an option: the average is a copy of the weights until step
    ``start``, then decays at ``decay``, constant (upstream, mmengine's momentum) or ramped in as
    ``min(decay, (1 + n) / (10 + n))`` (diffusers' default) when ``warmup``."""

    def __init__(self, parameters, *, decay: float, start: int = 0, warmup: bool = True):
        super().__init__(parameters, decay=decay, update_after_step=start, foreach=True)
        self.ramp = warmup

    def get_decay(self, optimization_step: int) -> float:
        if optimization_step <= self.update_after_step:
            return 0.0
        return super().get_decay(optimization_step) if self.ramp else self.decay


def split_batch(batch: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    """A collated batch in ``parts`` micro-batches (gradient accumulation), in order; ``skipped`` goes with the first."""
    n = len(batch["captions"])
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    out = []
    for i in range(parts):
        part = {k: v[bounds[i] : bounds[i + 1]] if isinstance(v, (list, torch.Tensor)) else v for k, v in batch.items() if k != "skipped"}
        out.append({**part, "skipped": batch["skipped"] if i == 0 else 0})
    return out


class TrainingRun:
    """One training run in ``out_dir`` on every process of an ``accelerate launch``; refuses to overwrite a run
    unless asked to resume it.

    ``batch_size`` is the global batch of one optimizer step: each of the ``world`` processes takes
    ``batch_size / world`` of it and runs them as ``accumulation`` micro-batches. Every random draw of training is
    made per sample (``vgt_core.randomness``), so the result does not depend on ``world`` or ``accumulation``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        precision: str,
        resume: bool,
        progress: bool,
        preset: dict | None,
        batch_size: int = 1,
        accumulation: int = 1,
    ):
        self.out = Path(out_dir)
        self.accelerator = Accelerator(
            mixed_precision=mixed_precision(precision),
            log_with="tensorboard",
            project_dir=str(self.out),
            cpu=not torch.accelerator.is_available(),  # so that processes launched on CPUs form a (gloo) group
        )
        acc = self.accelerator
        self.rank, self.world, self.accumulation = acc.process_index, acc.num_processes, accumulation
        if accumulation < 1 or batch_size % (self.world * accumulation):
            raise VGTError(
                f"batch_size {batch_size} (the global batch) must split evenly into {self.world} process(es) x "
                f"{accumulation} gradient_accumulation_steps; choose a multiple of {self.world * max(1, accumulation)}"
            )
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED) and acc.is_main_process:
            print(f"vgt: {acc.distributed_type.value} run; checkpoints hold sharded optimizer states (see docs/distributed.md)")
        # New, empty or an earlier run's folder only; the main process locks it for the run (released in finish).
        self.claim = prepare_output(self.out, RUN_KIND, "reuse", main_process=acc.is_main_process)
        if self.checkpoints() and not resume:
            self.claim.release()
            raise VGTError(f"{self.out} already holds checkpoints of a run: pass --resume to continue it, or a new --out")
        if resume and self.checkpoints() and preset is not None:
            self._check_same_preset(preset)
        acc.wait_for_everyone()  # every process has read OUT before the main one changes it
        if acc.is_main_process:
            self._remove_leftovers()
            if not self.checkpoints():
                self._truncate_log(0)  # a run killed before its first checkpoint: its log lines are not this run's
        acc.init_trackers("tb")
        self.device = acc.device
        if self.device.type == "cpu":
            flush_denormals()
        self.show_progress = progress and acc.is_main_process
        self.bar: tqdm | None = None
        self.skipped = 0  # unreadable images met so far by all processes, across resumes (kept in the checkpoints)
        self.stream: StreamLoader | None = None  # a streaming loader's position is saved per process
        self._stream_state: dict | None = None
        if preset is not None and acc.is_main_process:
            write_json(self.out / "preset.json", preset)

    @property
    def sharded_parameters(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
        acc = self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            return True
        return acc.distributed_type == DistributedType.DEEPSPEED and acc.state.deepspeed_plugin.zero_stage == 3

    def check_ema(self, decay: float | None, key: str) -> None:
        """The EMA averages whole parameters on each process: refuse it where they are sharded."""
        if decay and self.sharded_parameters:
            raise VGTError(
                f"{key}={decay} needs whole parameters on each process, and this {self.accelerator.distributed_type.value} "
                f"run shards them: set {key}=null, or train with DDP / DeepSpeed ZeRO-2 (docs/distributed.md)"
            )

    def _remove_leftovers(self) -> None:
        """Temporary folders a killed run left: ``OUT/.tmp-*`` (the model being written) and
        ``OUT/checkpoints/.tmp-*`` (a checkpoint being written). Only these names, only in vgt's own folders."""
        for folder in (self.out, self.out / CHECKPOINTS):
            if folder.is_dir():
                for tmp in folder.glob(".tmp-*"):
                    if tmp.is_dir() and not tmp.is_symlink():
                        shutil.rmtree(tmp, ignore_errors=True)

    def _check_same_preset(self, preset: dict) -> None:
        """``--resume`` continues the run that ``OUT/preset.json`` records: a changed number of steps is allowed and
        said; any other difference is refused, naming the keys (keys the recorded preset lacks, added by a newer
        vgt, are not compared)."""
        path = self.out / "preset.json"
        if not path.is_file():
            return
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            return
        changed = [key for key, value in _flatten(old).items() if _flatten(preset).get(key, value) != value]
        steps = [key for key in changed if re.fullmatch(r"train_(ar|ae\.stage\d+)\.steps", key)]
        others = [key for key in changed if key not in steps]
        if others:
            shown = ", ".join(f"{k} ({_flatten(old)[k]!r} -> {_flatten(preset).get(k)!r})" for k in others[:12])
            raise VGTError(
                f"--resume: {self.out} was trained with another preset; changed: {shown}"
                f"{f' and {len(others) - 12} more' if len(others) > 12 else ''}. Resume with the same preset and --set "
                "flags, or start a new --out"
            )
        if steps and self.accelerator.is_main_process:
            print(
                "vgt: --resume with changed steps: "
                + ", ".join(f"{k} {_flatten(old)[k]} -> {_flatten(preset)[k]}" for k in steps)
                + " (the learning-rate schedule follows the new total from here on)"
            )

    @property
    def _unsharded(self) -> bool:
        """Plain or data-parallel (DDP) training: whole tensors on each process, nothing for accelerate to wrap."""
        return self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)

    @property
    def _fused(self) -> bool:
        return self._unsharded and self.device.type in ("cpu", "cuda")

    def adamw(self, groups: list[dict], *, lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
        """AdamW with torch's fused kernel where the run is unsharded (one kernel over all tensors; on a CPU torch's
        default is a loop over the tensors, 3-5x slower for vgt's many small ones, bench/train_step.py). Its
        updates match the loop's within float rounding (~1e-8 per step). Sharded runs keep torch's default."""
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if self._fused else {}))

    def muon(
        self, named: Iterable[tuple[str, nn.Parameter]], hidden: set[int], *, lr: float, betas: tuple[float, float], weight_decay: float, key: str
    ) -> torch.optim.Optimizer:
        """Muon over the ``hidden`` matrices and AdamW over the rest (``vgt_core.training.muon``). Muon
        orthogonalises whole matrices, which FSDP and DeepSpeed shard across processes: those runs are refused.
        Data-parallel processes split the orthogonalisation between them (``BatchedMuon``'s ``process_group``)."""
        if not self._unsharded:
            raise VGTError(
                f"{key}=muon needs whole weight matrices on every process, and this {self.accelerator.distributed_type.value} "
                f"run shards them: set {key}=adamw, or train data-parallel (DDP)"
            )
        from vgt_core.training.muon import MuonWithAdamW  # it builds on optimizer_groups below

        group = torch.distributed.group.WORLD if self.accelerator.num_processes > 1 else None
        return MuonWithAdamW(named, hidden, lr=lr, betas=betas, weight_decay=weight_decay, fused=self._fused, process_group=group)

    def clip_gradients(self, parameters: list[nn.Parameter], max_norm: float) -> None:
        """Clip the gradients' global norm to ``max_norm``. Unsharded and without fp16 loss scaling this is torch's
        ``clip_grad_norm_`` with ``foreach`` (the same values as accelerate's, in fewer calls: accelerate's
        DTensor-aware path loops over the tensors on a CPU); otherwise accelerate's (unscaling, shards)."""
        if self._unsharded and self.accelerator.scaler is None:
            torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
        else:
            self.accelerator.clip_grad_norm_(parameters, max_norm)

    def averaged(self, scalars: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Loss terms (tensors on the device, or floats) averaged over processes, as floats: one collective and one
        host sync for all of them, not one per term."""
        keys = list(scalars)
        values = torch.stack([torch.as_tensor(scalars[k], dtype=torch.float32, device=self.device).reshape(()) for k in keys])
        if self.world > 1:
            values = self.accelerator.reduce(values, "mean")
        return dict(zip(keys, values.tolist()))

    def stop_if_not_finite(self, step: int, scalars: dict[str, float]) -> None:
        """Stop when a loss of this step is NaN or infinite, before the optimizer applies it: nothing of this step is
        saved or exported, the checkpoints on disk (the last good state) stay. Given ``averaged`` scalars, every
        process sees the same values (a NaN anywhere makes the mean NaN) and all stop together."""
        bad = sorted(k for k, v in scalars.items() if not math.isfinite(v))
        if not bad:
            return
        if self.bar is not None:
            self.bar.close()
        found = self.checkpoints()
        kept = f"the last good checkpoint is {found[-1]} (--resume continues from it)" if found else "no checkpoint was saved yet"
        which = ", ".join(f"{k}={scalars[k]}" for k in bad)
        raise VGTError(
            f"step {step}: the loss is not finite ({which}, averaged over processes); the run stops without applying, "
            f"saving or exporting it, and {kept}. Lower the learning rate, or check the data and mixed precision"
        )

    # -- data ---------------------------------------------------------------------------------------------------

    def loader(self, dataset, batch_size: int, seed: int, start: int, *, num_workers: int = 0, collate_fn=None):
        """This process's share of each global batch, from global batch ``start + 1`` on. A ``ShardSource`` is read
        as a stream (each process its own shards, ``vgt_core.streaming``), resumed from this process's saved state."""
        if isinstance(dataset, ShardSource):
            self._per_rank = batch_size // self.world
            self.stream = dataset.loader(self._per_rank, seed, self.rank, self.world, num_workers, self._stream_state)
            return self.stream
        kwargs = {"collate_fn": collate_fn} if collate_fn is not None else {}
        loader, _ = make_loader(
            dataset, batch_size, seed, num_workers=num_workers, start_state=start, rank=self.rank, world=self.world, **kwargs
        )
        return loader

    def draws(self, seed: int, step: int, positions: list[int]) -> SampleDraws:
        """The model's random draws for the samples at ``positions`` of global batch ``step``."""
        return SampleDraws.for_batch(seed, "train", step, positions)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        folder = self.out / CHECKPOINTS
        found = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name)] if folder.exists() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> None:
        """Every prepared model and optimizer through accelerate's ``save_state`` (safetensors weights; optimizer
        states sharded as the run is: DDP, FSDP or DeepSpeed), plus ``state`` (schedules, EMA, counters) as a
        safetensors + JSON tree, in one folder that appears atomically; older checkpoints beyond ``keep`` go.
        Every process must call it (saving sharded states is collective)."""
        acc = self.accelerator
        final = self.out / CHECKPOINTS / f"step-{step:08d}"
        tmp = final.with_name(f".tmp-{final.name}")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a run killed while writing left it; it is ours
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        streams = None
        if self.stream is not None:
            streams = gather_object([self.stream.state_dict()]) if self.world > 1 else [self.stream.state_dict()]
        acc.wait_for_everyone()
        if acc.is_main_process:
            extra = {"streams": [json.dumps(s) for s in streams]} if streams is not None else {}
            save_tree({"step": step, "skipped": self.skipped, "world": self.world, **extra, **state}, tmp, "state")
            if final.exists():  # a checkpoint of the same step from a run that was resumed before this step
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def load_latest(self) -> dict[str, Any] | None:
        """Restore the newest checkpoint into the prepared models and optimizers (call after ``prepare``); return
        its state tree (None if there is none)."""
        found = self.checkpoints()
        if not found:
            return None
        if not (found[-1] / "random_states_0.pkl").exists():
            raise VGTError(f"{found[-1]}: not a checkpoint of this vgt version (written before accelerate's state API); start a new run")
        self.accelerator.load_state(str(found[-1]))
        state = load_tree(found[-1], "state")
        self.skipped = state.pop("skipped", 0)
        world = state.pop("world", self.world)
        streams = state.pop("streams", None)
        if streams is not None:
            if world != self.world:
                raise VGTError(
                    f"{found[-1]}: a streaming run of {world} process(es) resumes on the same number, not {self.world} "
                    "(each process reads its own shards from where it stopped)"
                )
            self._stream_state = json.loads(streams[self.rank])
        self._truncate_log(state["step"])
        return state

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be written again), and any line a
        killed run left half-written."""
        path = self.out / "log.jsonl"
        if path.exists() and self.accelerator.is_main_process:
            kept = []
            for line in path.read_text(errors="replace").splitlines():
                try:
                    row = json.loads(line)
                    if int(row["step"]) <= step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # cut off mid-write
            path.write_text("".join(line + "\n" for line in kept))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole, unsharded state dict of a prepared model (collective under FSDP / ZeRO-3: call on every
        process); complete on the main process."""
        return self.accelerator.get_state_dict(model)

    # -- steps --------------------------------------------------------------------------------------------------

    def batches(self, loader: Iterable[dict[str, Any]], start: int, total: int, desc: str) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """``(step, micro-batches)`` for steps ``start + 1 .. total``, the progress bar running. Unreadable images
        are counted in ``skipped`` (summed over processes); a micro-batch left empty on any process is dropped by
        all (so that every process runs the same forward and backward passes); a step left with none is passed
        over, spent as in an uninterrupted run."""
        self.start_progress(total, start, desc)
        batches = iter(loader)
        for step in range(start + 1, total + 1):
            batch = next(batches)
            if "positions" not in batch:  # a stream: the positions of this process's share
                first = self.rank * self._per_rank
                batch["positions"] = list(range(first, first + len(batch["captions"])))
            parts = split_batch(batch, self.accumulation)
            lowest, skipped = [len(p["captions"]) for p in parts], parts[0]["skipped"]
            if self.world > 1:  # every process must agree on the micro-batches it runs
                counts, lost = torch.tensor(lowest, device=self.device), torch.tensor([skipped], device=self.device)
                torch.distributed.all_reduce(counts, torch.distributed.ReduceOp.MIN)
                torch.distributed.all_reduce(lost, torch.distributed.ReduceOp.SUM)
                lowest, skipped = counts.tolist(), int(lost.item())
            self.skipped += skipped
            kept = [p for p, n in zip(parts, lowest) if n > 0]
            if not kept:
                continue  # nothing readable to learn from; the count above keeps the loss of data visible
            yield step, kept

    def micro_steps(self, model: nn.Module, parts: list[Any]) -> Iterator[Any]:
        """Each micro-batch in a context where gradients are synchronised across processes on the last only."""
        for i, part in enumerate(parts):
            if i + 1 < len(parts) and self.world > 1:
                with self.accelerator.no_sync(model):
                    yield part
            else:
                yield part

    def mean_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """A detached tensor averaged over processes (state that every process must hold alike)."""
        if self.world == 1:
            return value
        return self.accelerator.reduce(value.detach().clone(), "mean")

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


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def log_file(out_dir: str | Path) -> list[dict]:
    """The scalars a run logged (for curves and tests)."""
    path = Path(out_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
