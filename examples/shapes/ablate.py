"""``vgt ablate``: the paper's ablations, run on the shapes world, one matrix of ``registry.yaml`` at a time.

Every cell of a matrix is the demo's pipeline (``vgt demo``) on the matrix's base preset with the cell's dotted
overrides: VGT-AE stage 1 -> stage 2 -> latent cache -> AR training -> generation at the cell's tokens per step
-> mini-GenEval. Work that is honestly identical between cells is done once and shared through ``OUT/shared/``,
each piece in a folder named by a hash of exactly the settings it depends on:

* the understanding VLM (``vlm-*``), pre-trained once per ablation;
* each VGT-AE stage (``ae1-*``, ``ae2-*``): cells that differ only after stage 1 share stage 1, and cells that
  differ only on the AR side share the whole autoencoder;
* the latent cache and the reconstruction scores of a final autoencoder (``latents-*``);
* the generator (``ar-*``): cells that differ only in generation settings (e.g. 1 vs 4 tokens per step) share it.

A cell writes ``OUT/<cell>/metrics.json`` when it is done; a re-run skips it (so a killed ablation resumes,
and a killed training resumes from its last checkpoint). A cell that fails is recorded with its error and the
others still run. ``OUT/results.csv``, ``results.md`` and ``results.png`` tabulate every cell.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vgt_core.config import Matrix, Preset, PresetBook, load_presets  # noqa: E402
from vgt_core.errors import ConfigError, unknown_name_message  # noqa: E402
from vgt_core.serialization import prepare_output, write_json  # noqa: E402
from vgt_core.training.autoencoder import train_autoencoder  # noqa: E402
from vgt_core.training.autoregressive import train_generator  # noqa: E402
from vgt_shapes import ShapesDataset, ShapesOptions  # noqa: E402
from vgt_shapes import demo  # noqa: E402
from vgt_shapes.understanding import pretrain_understanding  # noqa: E402
from vgt_shapes.world import TASKS, ShapesWorld  # noqa: E402

DONE = "done.json"
METRICS = [
    "psnr",
    "ssim",
    "geneval_overall",
    *(f"geneval_{task}" for task in TASKS),
    "gen_s_per_image",
    "ae_train_s",
    "ar_train_s",
    "wall_s",
]
COLUMNS = ["cell", "status", "tokens_per_step", *METRICS, "overrides", "error"]
HEADERS = {"psnr": "PSNR", "ssim": "SSIM", "geneval_overall": "GenEval", "gen_s_per_image": "s/image",
           "ae_train_s": "AE train s", "ar_train_s": "AR train s", "wall_s": "wall s", "tokens_per_step": "tok/step"}
PLOTTED = [("psnr", "reconstruction PSNR (dB)"), ("ssim", "reconstruction SSIM"),
           ("geneval_overall", "mini-GenEval overall"), ("gen_s_per_image", "generation s / image")]


@dataclass(frozen=True)
class Budget:
    """What a cell spends besides the preset's training steps: the demo's full or quick sizes by default."""

    understanding_steps: int
    cached_images: int
    reconstruction_images: int
    samples_per_prompt: int
    prompts_per_task: int | None
    understanding_eval_images: int = 256

    @classmethod
    def of(cls, quick: bool) -> Budget:
        mode = "quick" if quick else "full"
        return cls(
            understanding_steps=demo.UNDERSTANDING_STEPS[mode],
            cached_images=demo.CACHED_IMAGES[mode],
            reconstruction_images=demo.RECONSTRUCTION_IMAGES[mode],
            samples_per_prompt=demo.SAMPLES_PER_PROMPT[mode],
            prompts_per_task=demo.PROMPTS_PER_TASK[mode],
        )


def run_ablation(
    matrix_name: str,
    out: str | Path,
    *,
    steps: int | None = None,
    quick: bool = False,
    progress: bool = True,
    registry: list[str | Path] | None = None,
    budget: Budget | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every cell of ``matrix_name`` into ``out`` and write the results table.

    ``steps`` caps the training steps of every phase (understanding, both AE stages, AR), ``quick`` uses the
    demo's quick settings, ``registry`` adds registry files to the built-in one. Returns one row per cell
    (``status`` ``ok`` or ``failed``), in the matrix's order.
    """
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    budget = budget or Budget.of(quick)
    if steps is not None:
        budget = Budget(**{**asdict(budget), "understanding_steps": min(steps, budget.understanding_steps)})
    return Ablation(load_presets(registry), matrix_name, Path(out), budget, steps, quick, progress).run()


class Ablation:
    """One matrix in one output folder; builds each cell's preset and the artefacts cells share."""

    def __init__(self, book: PresetBook, matrix_name: str, out: Path, budget: Budget, steps: int | None, quick: bool, progress: bool):
        self.book = book
        self.name = matrix_name
        self.matrix: Matrix = self.book.matrix(matrix_name)
        for metric in self.matrix.metrics:
            if metric not in METRICS:
                raise ConfigError(unknown_name_message("metric", metric, METRICS, f"matrices.{matrix_name}.metrics"))
        self.base = self.book.preset(self.matrix.base)
        if self.base.encoder.name != "internvl3" or not self.base.encoder.options.get("config"):
            raise ConfigError(
                f"matrices.{matrix_name}: base preset {self.matrix.base!r} must have an `internvl3` encoder with a "
                "`config`, like shapes-demo: the ablation pre-trains that VLM on the shapes world first"
            )
        if self.base.dataset is None or self.base.dataset.name != "shapes":
            raise ConfigError(f"matrices.{matrix_name}: base preset {self.matrix.base!r} must train on the `shapes` dataset")
        self.out = Path(out).resolve()
        self.shared = self.out / "shared"
        self.steps, self.quick, self.progress, self.budget = steps, quick, progress, budget
        self.vlm_spec = {"config": self.base.encoder.options["config"], "world": demo.world_of(self.base).model_dump(),
                         "steps": self.budget.understanding_steps, "eval_images": self.budget.understanding_eval_images}
        self.vlm = self.shared / f"vlm-{digest(self.vlm_spec, self.out)}"
        # A shared generator is trained (its samples, its saved defaults) with the base's generation settings:
        # they are not part of what it is shared on; each cell then generates with its own.
        self.base_generation = self.cell_preset({}).generation

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        cells = self.matrix.expand()
        # New, empty or an earlier ablation's folder (whose finished cells are reused); locked while this runs.
        claim = prepare_output(self.out, "vgt-ablation", "reuse")
        settings = {"matrix": self.name, "base": self.matrix.base, "quick": self.quick, "steps": self.steps,
                    "budget": asdict(self.budget), "cells": cells}
        write_json(self.out / "ablation.json", settings)
        rows = []
        for i, (label, overrides) in enumerate(cells.items(), 1):
            self._say(f"\n== [{i}/{len(cells)}] {label}")
            rows.append(self.run_cell(label, overrides))
            self._say(f"== {label}: {rows[-1]['status']}" + (f" ({rows[-1]['error']})" if rows[-1]["error"] else ""))
        write_results(self.out, self.name, self.matrix, rows, self._run_notes())
        claim.release()
        return rows

    def run_cell(self, label: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """One cell: skipped when its ``metrics.json`` matches its settings, recorded as failed if it raises."""
        folder = self.out / folder_name(label)
        row: dict[str, Any] = {"cell": label, "overrides": json.dumps(overrides, sort_keys=True)}
        started = time.time()
        try:
            preset = self.cell_preset(overrides)
            key = digest({"preset": preset.model_dump(mode="json"), "budget": asdict(self.budget)}, self.out)
            done = folder / "metrics.json"
            if done.exists() and json.loads(done.read_text()).get("config_key") == key:
                self._say("   done earlier: skipped")
                return {**row, **flat(json.loads(done.read_text()))}
            (folder / "error.txt").unlink(missing_ok=True)
            metrics = self._run_cell(label, preset, folder)
            metrics.update(config_key=key, overrides=overrides)
            metrics["seconds"]["wall"] = round(time.time() - started, 1)
            write_json(done, metrics)
            return {**row, **flat(metrics)}
        except Exception as exc:  # noqa: BLE001 - one cell's failure is a result; the others still run
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "error.txt").write_text(traceback.format_exc())
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            return {**row, "status": "failed", "error": message[:300], "wall_s": round(time.time() - started, 1)}

    def cell_preset(self, overrides: dict[str, Any]) -> Preset:
        """Base preset + (the understanding VLM as encoder/backbone) + (demo's quick settings) + the cell's
        overrides, with every training phase capped at ``steps``. A cell that replaces the whole ``encoder`` or
        ``backbone`` mapping brings its own component instead of the VLM."""
        changes = {**demo.understanding_overrides(self.vlm), **(demo.QUICK if self.quick else {}), **overrides}
        preset = self.book.preset(self.matrix.base, changes)
        if self.steps is None:
            return preset
        ae = preset.train_ae
        stages = {name: cfg.model_copy(update={"steps": min(self.steps, cfg.steps)})
                  for name, cfg in (("stage1", ae.stage1), ("stage2", ae.stage2)) if cfg is not None}
        return preset.model_copy(update={
            "train_ae": ae.model_copy(update=stages),
            "train_ar": preset.train_ar.model_copy(update={"steps": min(self.steps, preset.train_ar.steps)}),
        })

    def _run_cell(self, label: str, preset: Preset, folder: Path) -> dict[str, Any]:
        if self._uses_vlm(preset):
            self._pretrain_understanding()
        world = demo.world_of(preset)
        size = world.image_size

        ae_dir, ae_seconds = self.autoencoder(preset, world)
        latents_dir, evaluation = self.artifact(
            "latents",
            {"autoencoder": ae_dir.parent.name, "images": self.budget.cached_images, "world": world.model_dump(),
             "reconstruction_images": self.budget.reconstruction_images},
            lambda out: {
                "manifest": demo.cache_world_latents(ae_dir, world, self.budget.cached_images, out, self.progress),
                "reconstruction": demo.reconstruction_metrics(ae_dir, world, self.budget.reconstruction_images, self.progress),
            },
        )
        trained = preset.model_copy(update={"generation": self.base_generation})
        ar_dir, ar_info = self.artifact(
            "ar",
            {"autoencoder": ae_dir.parent.name, "latents": latents_dir.name,
             **{k: preset.model_dump(mode="json")[k] for k in ("backbone", "sampler", "generator", "train_ar")}},
            lambda out: {"model": str(train_generator(trained, ae_dir, out, data=latents_dir, resume=True, progress=self.progress))},
        )

        from vgt_core.pipeline import VGTPipeline
        from vgt_shapes.scorer import score_folder

        prompts = ShapesWorld(image_size=size).evaluation_prompts(per_task=self.budget.prompts_per_task)
        k = self.budget.samples_per_prompt
        shutil.rmtree(folder / "geneval", ignore_errors=True)  # a stale attempt's images must not be scored
        pipe = VGTPipeline.from_pretrained(ar_dir / "model")
        settings = preset.generation.model_dump(exclude={"seed"})
        seconds = demo.generate_geneval(pipe, prompts, k, folder / "geneval", self.progress, **settings)
        scores = score_folder(folder / "geneval")
        write_json(folder / "preset.json", preset.model_dump(mode="json"))
        return {
            "cell": label,
            "status": "ok",
            "tokens_per_step": preset.generation.tokens_per_step,
            "reconstruction": evaluation["reconstruction"],
            "geneval": {"overall": scores["overall"], "per_task": scores["per_task"], "images": scores["images"]},
            "seconds": {"ae_train": ae_seconds, "ar_train": ar_info["seconds"], "generation": round(seconds, 1),
                        "per_image": round(seconds / max(1, len(prompts) * k), 4)},
            "artifacts": {"autoencoder": str(ae_dir.relative_to(self.out)), "latents": str(latents_dir.relative_to(self.out)),
                          "generator": str((ar_dir / "model").relative_to(self.out))},
        }

    # -- shared artefacts ---------------------------------------------------------------------------------------

    def artifact(self, kind: str, spec: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
        """``OUT/shared/<kind>-<hash of spec>``: built once by ``build(folder)``, then reused by every cell whose
        spec is the same. ``done.json`` (the spec, build's result and its seconds) marks it finished."""
        folder = self.shared / f"{kind}-{digest(spec, self.out)}"
        done = folder / DONE
        if done.exists():
            return folder, json.loads(done.read_text())
        self._say(f"   {kind}: building {folder.relative_to(self.out)}")
        started = time.time()
        info = build(folder)
        info = {**info, "seconds": round(time.time() - started, 1), "spec": spec}
        write_json(done, info)
        return folder, info

    def autoencoder(self, preset: Preset, world: ShapesOptions) -> tuple[Path, float]:
        """The cell's final VGT-AE model folder and the seconds its stages took (stage 1 alone when
        ``train_ae.stage2`` is null)."""
        data = ShapesDataset(world)
        dumped = preset.model_dump(mode="json")
        common = {k: dumped[k] for k in ("encoder", "decoder", "image_size")}
        train = train_autoencoder
        stage1, info1 = self.artifact(
            "ae1", {**common, "world": world.model_dump(), "stage1": dumped["train_ae"]["stage1"]},
            lambda out: {"model": str(train(preset, out, stage=1, data=data, resume=True, progress=self.progress))},
        )
        if preset.train_ae.stage2 is None:
            return stage1 / "model", info1["seconds"]
        stage2, info2 = self.artifact(
            "ae2", {"stage1": stage1.name, "stage2": dumped["train_ae"]["stage2"]},
            lambda out: {"model": str(train(preset, out, stage=2, init=stage1, data=data, resume=True, progress=self.progress))},
        )
        return stage2 / "model", round(info1["seconds"] + info2["seconds"], 1)

    def _uses_vlm(self, preset: Preset) -> bool:
        return any(spec is not None and spec.options.get("pretrained") == str(self.vlm) for spec in (preset.encoder, preset.backbone))

    def _pretrain_understanding(self) -> None:
        """The base preset's VLM learns to describe shapes: once per output folder, shared by every cell."""
        if (self.vlm / DONE).exists():
            return
        self._say(f"   understanding VLM: pre-training {self.vlm.relative_to(self.out)}")
        spec = self.vlm_spec
        result = pretrain_understanding(
            spec["config"], self.vlm, world=ShapesOptions.model_validate(spec["world"]), steps=spec["steps"],
            eval_images=spec["eval_images"], progress=self.progress,
        )
        write_json(self.vlm / DONE, {"before": result["before"], "after": result["after"], "seconds": round(result["seconds"], 1), "spec": spec})

    def _run_notes(self) -> list[str]:
        b = self.budget
        notes = [
            f"- base preset: `{self.matrix.base}`: {self.base.description}",
            f"- budgets: {'quick' if self.quick else 'full'} (the demo's); training steps capped at {self.steps}"
            if self.steps else f"- budgets: {'quick' if self.quick else 'full'} (the demo's); training steps as in each cell's preset",
            f"- understanding pre-training {b.understanding_steps} steps; latent cache {b.cached_images} images; "
            f"reconstruction on {b.reconstruction_images} held-out images; mini-GenEval with {b.samples_per_prompt} "
            f"image(s) per prompt, {'every' if b.prompts_per_task is None else b.prompts_per_task} prompt(s) per task",
        ]
        if (self.vlm / DONE).exists():
            after = json.loads((self.vlm / DONE).read_text())["after"]
            notes.append(f"- understanding VLM after pre-training: token accuracy {after['token_accuracy']:.3f}, "
                         f"descriptions fully right {after['exact_match']:.3f}")
        return notes

    def _say(self, line: str) -> None:
        if self.progress:
            print(line, flush=True)


# -- helpers ----------------------------------------------------------------------------------------------------


def digest(spec: Any, root: Path) -> str:
    """A short hash of ``spec`` that does not depend on where the output folder lives."""
    text = json.dumps(spec, sort_keys=True, default=str).replace(str(root), "<out>")
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def folder_name(label: str) -> str:
    """A cell label as a folder name (axes labels hold '=' and ',', which are kept)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)


def flat(metrics: dict[str, Any]) -> dict[str, Any]:
    """A cell's ``metrics.json`` as one row of the results table."""
    rec, gen, sec = metrics["reconstruction"], metrics["geneval"], metrics["seconds"]
    m = metrics["tokens_per_step"]
    return {
        "status": metrics["status"],
        "tokens_per_step": m if isinstance(m, int) else "+".join(map(str, m)),
        "psnr": round(rec["psnr"], 3),
        "ssim": round(rec["ssim"], 4),
        "geneval_overall": round(gen["overall"], 4),
        **{f"geneval_{task}": round(gen["per_task"].get(task, float("nan")), 4) for task in TASKS},
        "gen_s_per_image": sec["per_image"],
        "ae_train_s": sec["ae_train"],
        "ar_train_s": sec["ar_train"],
        "wall_s": sec["wall"],
        "error": "",
    }


# -- results ----------------------------------------------------------------------------------------------------


def write_results(out: Path, name: str, matrix: Matrix, rows: list[dict[str, Any]], notes: Sequence[str] = ()) -> None:
    """``results.csv`` (every column), ``results.md`` (the matrix's metrics) and ``results.png`` (bars)."""
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in COLUMNS})

    shown = ["tokens_per_step", *(matrix.metrics or METRICS)]
    header = ["cell", "status", *(HEADERS.get(c, c.removeprefix("geneval_")) for c in shown)]
    lines = [f"# Ablation `{name}`", "", matrix.description, "", *notes, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([f"`{row['cell']}`", row["status"], *(_cell_text(row.get(c, "")) for c in shown)]) + " |")
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        lines += ["", "Failed cells (traceback in `<cell>/error.txt`):", "",
                  *(f"- `{row['cell']}`: {row['error']}" for row in failed)]
    lines += ["", "Cells (overrides of the base preset):", "",
              *(f"- `{row['cell']}`: `{row['overrides']}`" for row in rows),
              "", "![results](results.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot_results(out / "results.png", name, rows)


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value) if value != "" else "-"


def plot_results(path: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    """One bar panel per main metric, a bar per cell; failed cells are marked, not drawn."""
    labels = [row["cell"] for row in rows]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(max(10, 1.1 * len(labels) * len(PLOTTED)), 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes[0], PLOTTED):
        values = [row.get(metric) if row["status"] == "ok" else None for row in rows]
        bars = ax.bar(range(len(labels)), [v if isinstance(v, (int, float)) else 0 for v in values], color="tab:blue")
        ax.bar_label(bars, [f"{v:.3g}" if isinstance(v, (int, float)) else "" for v in values], fontsize=7)
        for i, v in enumerate(values):
            if not isinstance(v, (int, float)):
                ax.text(i, 0, "failed", rotation=90, ha="center", va="bottom", fontsize=7, color="tab:red")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"ablation {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
