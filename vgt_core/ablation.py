"""``vgt ablate``: one matrix of ``registry.yaml``, every cell trained, scored and tabulated, on any data.

A cell is the matrix's base preset with the cell's dotted overrides. It trains VGT-AE stage 1 (and stage 2 unless
``train_ae.stage2`` is null) on the training data, then each of the matrix's evaluators scores it
(``vgt_core.evaluators``): an evaluator of the autoencoder (``reconstruction``: PSNR/SSIM on held-out images) needs
nothing more; an evaluator of the generator (e.g. the shapes world's ``shapes-geneval``) makes the cell cache
latents, train the AR model and hand it the pipeline. A matrix may name a ``prepare`` step run once before the
cells (the shapes world pre-trains its VLM), whose overrides apply to every cell.

Data: ``data`` (an image folder, JSONL or tar shards) or the base preset's registered ``dataset``. The evaluators
score ``eval_data`` when given, else the last ``Budget.eval_images`` items of the training data, which are then
held out of training.

Work that is honestly identical between cells is done once and shared through ``OUT/shared/``, each piece in a
folder named by a hash of exactly the settings it depends on: each VGT-AE stage (``ae1-*``, ``ae2-*``), the scores
of an autoencoder evaluator (``eval-*``), the latent cache (``latents-*``), the generator (``ar-*``: cells that
differ only in generation settings share it) and whatever the preparation builds (e.g. ``vlm-*``).

A cell writes ``OUT/<cell>/metrics.json`` when it is done; a re-run skips it (so a killed ablation resumes, and a
killed training resumes from its last checkpoint). A cell that fails is recorded with its error
(``OUT/<cell>/error.txt``) and the others still run. ``OUT/results.csv``, ``results.md`` and ``results.png``
tabulate every cell.
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

import torch
from torch.utils.data import Dataset, Subset

from vgt_core.config import Matrix, Preset, PresetBook, check_matrix_components, load_presets
from vgt_core.errors import ConfigError, unknown_name_message
from vgt_core.data import open_source
from vgt_core.evaluators import EvalContext, Evaluator, Preparation, Prepared, PrepareContext
from vgt_core import plugins
from vgt_core.serialization import prepare_output, write_json
from vgt_core.training.autoencoder import train_autoencoder
from vgt_core.training.autoregressive import train_generator

KIND = "vgt-ablation"  # the output folder's kind marker
DONE = "done.json"
TIMES = {"ae_train_s": "AE train s", "ar_train_s": "AR train s", "wall_s": "wall s"}


@dataclass(frozen=True)
class Budget:
    """What a cell spends besides its preset's training steps (evaluators have their own options)."""

    latent_images: int = 16_384  # training images encoded once into the latent cache (generator cells only)
    eval_images: int = 512  # images held out of the training data for the evaluators (when no eval_data)

    @classmethod
    def of(cls, quick: bool) -> Budget:
        return cls(latent_images=2048, eval_images=64) if quick else cls()


def run_ablation(
    matrix_name: str,
    out: str | Path,
    *,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    steps: int | None = None,
    quick: bool = False,
    progress: bool = True,
    registry: list[str | Path] | None = None,
    budget: Budget | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every cell of ``matrix_name`` into ``out`` and write the results table.

    ``data``/``eval_data``: training and held-out images (see the module's doc). ``steps`` caps the training steps
    of every phase, ``quick`` asks the preparation and the evaluators for their smoke budgets (and ``Budget.of``),
    ``registry`` adds registry files to the built-in one, ``overrides`` (dotted keys) apply to every cell before
    the cell's own. Returns one row per cell (``status`` ``ok`` or ``failed``), in the matrix's order.
    """
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    ablation = Ablation(
        load_presets(registry), matrix_name, Path(out), data=data, eval_data=eval_data, budget=budget or Budget.of(quick),
        steps=steps, quick=quick, progress=progress, overrides=overrides or {},
    )  # fmt: skip
    return ablation.run()


class Ablation:
    """One matrix in one output folder; builds each cell's preset and the artefacts cells share."""

    def __init__(self, book: PresetBook, matrix_name: str, out: Path, *, data: str | Path | None, eval_data: str | Path | None,
                 budget: Budget, steps: int | None, quick: bool, progress: bool, overrides: dict[str, Any]):  # fmt: skip
        self.book, self.name = book, matrix_name
        self.matrix: Matrix = book.matrix(matrix_name)
        self.where = f"matrices.{matrix_name}"
        self.base = book.preset(self.matrix.base, overrides)
        check_matrix_components(self.matrix, self.where)
        self._build_evaluators()
        spec = self.matrix.prepare
        self.preparation = _built("preparation", spec, Preparation, "prepare") if spec is not None else None
        self.data = Path(data).resolve() if data is not None else None
        self.eval_data = Path(eval_data).resolve() if eval_data is not None else None
        if self.data is None and self.base.dataset is None:
            raise ConfigError(f"{self.where}: base preset {self.matrix.base!r} has no `dataset`: pass --data (images to train on)")
        # Paths are read (and a held-out split checked) now, before any folder is made; each cell reuses them.
        self.source = open_source(self.data) if self.data is not None else None
        self.eval_source = open_source(self.eval_data) if self.eval_data is not None else None
        if self.source is not None and self.eval_source is None:
            _check_split(len(self.source), budget.eval_images)
        self.out = Path(out).resolve()
        self.shared = self.out / "shared"
        self.steps, self.quick, self.progress, self.budget, self.overrides = steps, quick, progress, budget, overrides
        self.prepared = Prepared()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def _build_evaluators(self) -> None:
        """The matrix's evaluators by name, their table columns, whether a generator is needed, the shown metrics."""
        self.evaluators: dict[str, tuple[dict[str, Any], Evaluator]] = {}
        self.headers: dict[str, str] = {}
        for spec in self.matrix.evaluators:
            if spec.name in self.evaluators:
                raise ConfigError(f"{self.where}.evaluators: {spec.name!r} is listed twice")
            evaluator = _built("evaluator", spec, Evaluator, "evaluate")
            self.evaluators[spec.name] = (spec.model_dump(mode="json"), evaluator)
            for column, header in evaluator.columns.items():
                if column in self.headers or column in TIMES or column in ("cell", "status", "tokens_per_step"):
                    raise ConfigError(f"{self.where}.evaluators: {spec.name!r} reports the column {column!r}, "
                                      "which another evaluator or the runner reports too")  # fmt: skip
                self.headers[column] = header
        self.generates = any(e.needs == "generator" for _, e in self.evaluators.values())
        self.times = {k: v for k, v in TIMES.items() if self.generates or k != "ar_train_s"}
        for metric in self.matrix.metrics:
            if metric not in {**self.headers, **self.times}:
                raise ConfigError(unknown_name_message("metric", metric, [*self.headers, *self.times], f"{self.where}.metrics"))

    @property
    def columns(self) -> list[str]:
        """The columns of ``results.csv``, in order."""
        return ["cell", "status", *(["tokens_per_step"] * self.generates), *self.headers, *self.times, "overrides", "error"]

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        cells = self.matrix.expand()
        # New, empty or an earlier ablation's folder (whose finished cells are reused); locked while this runs.
        claim = prepare_output(self.out, KIND, "reuse")
        try:
            settings = {"matrix": self.name, "base": self.matrix.base, "quick": self.quick, "steps": self.steps,
                        "budget": asdict(self.budget), "data": _text(self.data), "eval_data": _text(self.eval_data),
                        "overrides": self.overrides, "evaluators": [s for s, _ in self.evaluators.values()],
                        "prepare": self.matrix.prepare and self.matrix.prepare.model_dump(mode="json"), "cells": cells}
            write_json(self.out / "ablation.json", settings)
            if self.preparation is not None:
                self._say(f"== prepare: {self.matrix.prepare.name}")
                self.prepared = self.preparation.prepare(
                    PrepareContext(self.base, self.name, self.artifact, self.steps, self.quick, self.progress)
                )
            # A shared generator is trained (its samples, its saved defaults) with the base's generation settings:
            # they are not part of what it is shared on; each cell then generates with its own.
            self.base_generation = self.cell_preset({}).generation
            rows = []
            for i, (label, overrides) in enumerate(cells.items(), 1):
                self._say(f"\n== [{i}/{len(cells)}] {label}")
                rows.append(self.run_cell(label, overrides))
                self._say(f"== {label}: {rows[-1]['status']}" + (f" ({rows[-1]['error']})" if rows[-1]["error"] else ""))
            write_results(self.out, self.name, self.matrix, rows, self.columns, self.shown(), {**self.headers, **self.times},
                          self.plots(), self._run_notes())  # fmt: skip
        finally:
            claim.release()
        return rows

    def run_cell(self, label: str, overrides: dict[str, Any]) -> dict[str, Any]:
        """One cell: skipped when its ``metrics.json`` matches its settings, recorded as failed if it raises."""
        folder = self.out / folder_name(label)
        row: dict[str, Any] = {"cell": label, "overrides": json.dumps(overrides, sort_keys=True)}
        started = time.time()
        try:
            preset = self.cell_preset(overrides)
            key = digest({"preset": preset.model_dump(mode="json"), "budget": asdict(self.budget), "quick": self.quick,
                          "data": _text(self.data), "eval_data": _text(self.eval_data),
                          "evaluators": [s for s, _ in self.evaluators.values()]}, self.out)  # fmt: skip
            done = folder / "metrics.json"
            if done.exists() and json.loads(done.read_text()).get("config_key") == key:
                self._say("   done earlier: skipped")
                return {**row, **self.flat(json.loads(done.read_text()))}
            (folder / "error.txt").unlink(missing_ok=True)
            metrics = self._run_cell(label, preset, folder)
            metrics.update(config_key=key, overrides=overrides)
            metrics["seconds"]["wall"] = round(time.time() - started, 1)
            write_json(done, metrics)
            return {**row, **self.flat(metrics)}
        except Exception as exc:  # noqa: BLE001 - one cell's failure is a result; the others still run
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "error.txt").write_text(traceback.format_exc())
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            return {**row, "status": "failed", "error": message[:300], "wall_s": round(time.time() - started, 1)}

    def cell_preset(self, overrides: dict[str, Any]) -> Preset:
        """Base preset + the preparation's overrides + the run's overrides + the cell's, with every training phase
        capped at ``steps``. A cell that replaces a whole mapping (``encoder:``) replaces what came before it."""
        preset = self.book.preset(self.matrix.base, {**self.prepared.overrides, **self.overrides, **overrides})
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
        if self.generates and (preset.backbone is None or preset.sampler is None):  # before any training
            needing = [n for n, (_, e) in self.evaluators.items() if e.needs == "generator"]
            raise ConfigError(f"evaluator(s) {', '.join(needing)} score a generator, but the cell's preset has no backbone/sampler")
        train, held_out, data_spec = self.data_for(preset)
        ae_dir, ae_seconds = self.autoencoder(preset, train, data_spec)
        context = EvalContext(preset, ae_dir, held_out, folder, quick=self.quick, progress=self.progress, device=self.device)
        evaluations, seconds, artifacts = {}, {"ae_train": ae_seconds}, {"autoencoder": self._rel(ae_dir)}
        for name, (spec, evaluator) in self.evaluators.items():
            if evaluator.needs == "autoencoder":
                shared, info = self.artifact(
                    "eval", {"autoencoder": ae_dir.parent.name, "data": data_spec, "evaluator": spec, "quick": self.quick},
                    lambda out, e=evaluator: {"result": e.evaluate(_with(context, folder=_made(out)))},
                )
                evaluations[name] = info["result"]
                artifacts[name] = self._rel(shared)
        metrics: dict[str, Any] = {"cell": label, "status": "ok"}
        if self.generates:
            generator, ar_seconds = self.generator(preset, ae_dir, train, data_spec)
            seconds["ar_train"] = ar_seconds
            artifacts["generator"] = self._rel(generator)
            metrics["tokens_per_step"] = preset.generation.tokens_per_step
            for name, (_, evaluator) in self.evaluators.items():
                if evaluator.needs == "generator":
                    own = folder / name
                    shutil.rmtree(own, ignore_errors=True)  # a stale attempt's outputs must not be scored
                    own.mkdir(parents=True)
                    evaluations[name] = evaluator.evaluate(_with(context, folder=own, generator=generator))
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "preset.json", preset.model_dump(mode="json"))
        return {**metrics, "evaluations": evaluations, "seconds": seconds, "artifacts": artifacts}

    # -- data and shared artefacts ------------------------------------------------------------------------------

    def data_for(self, preset: Preset) -> tuple[Dataset, Dataset, dict[str, Any]]:
        """The cell's training items, its held-out items, and the spec that identifies both (for the hashes)."""
        if self.source is not None:
            source, spec = self.source, {"data": str(self.data)}
        elif preset.dataset is not None:
            source = plugins.registry().build("dataset", preset.dataset.name, preset.dataset.options)
            spec = {"dataset": preset.dataset.model_dump(mode="json")}
        else:
            raise ConfigError("the cell's preset has no `dataset`: pass --data (images to train on)")
        if self.eval_source is not None:
            return source, self.eval_source, {**spec, "eval_data": str(self.eval_data)}
        n = self.budget.eval_images
        _check_split(len(source), n)
        split = len(source) - n
        return Subset(source, range(split)), Subset(source, range(split, len(source))), {**spec, "held_out": n}

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
        folder.mkdir(parents=True, exist_ok=True)
        write_json(done, info)
        return folder, info

    def autoencoder(self, preset: Preset, data: Dataset, data_spec: dict[str, Any]) -> tuple[Path, float]:
        """The cell's final VGT-AE model folder and the seconds its stages took (stage 1 alone when
        ``train_ae.stage2`` is null)."""
        dumped = preset.model_dump(mode="json")
        common = {k: dumped[k] for k in ("encoder", "decoder", "image_size")}
        stage1, info1 = self.artifact(
            "ae1", {**common, "data": data_spec, "stage1": dumped["train_ae"]["stage1"]},
            lambda out: {"model": str(train_autoencoder(preset, out, stage=1, data=data, resume=True, progress=self.progress))},
        )
        if preset.train_ae.stage2 is None:
            return stage1 / "model", info1["seconds"]
        stage2, info2 = self.artifact(
            "ae2", {"stage1": stage1.name, "stage2": dumped["train_ae"]["stage2"]},
            lambda out: {"model": str(train_autoencoder(preset, out, stage=2, init=stage1, data=data, resume=True, progress=self.progress))},
        )
        return stage2 / "model", round(info1["seconds"] + info2["seconds"], 1)

    def generator(self, preset: Preset, ae_dir: Path, train: Dataset, data_spec: dict[str, Any]) -> tuple[Path, float]:
        """The cell's VGT pipeline folder (trained on a latent cache of the first ``latent_images`` training
        items) and the seconds its training took."""
        n = min(self.budget.latent_images, len(train))

        def cache(out: Path) -> dict[str, Any]:
            from vgt_core.autoencoder import VGTAutoencoder
            from vgt_core.data import open_dataset
            from vgt_core.latents import cache_latents

            ae = VGTAutoencoder.from_pretrained(ae_dir, map_location=self.device)
            images = open_dataset(Subset(train, range(n)), ae.image_size)
            # the cache records its autoencoder, which train_generator checks
            return {"manifest": cache_latents(ae, images, out, batch_size=128, progress=self.progress, source=ae_dir)}

        latents, _ = self.artifact("latents", {"autoencoder": ae_dir.parent.name, "data": data_spec, "images": n}, cache)
        trained = preset.model_copy(update={"generation": self.base_generation})
        dumped = preset.model_dump(mode="json")
        ar_dir, info = self.artifact(
            "ar",
            {"autoencoder": ae_dir.parent.name, "latents": latents.name,
             **{k: dumped[k] for k in ("backbone", "sampler", "generator", "train_ar")}},
            lambda out: {"model": str(train_generator(trained, ae_dir, out, data=latents, resume=True, progress=self.progress))},
        )
        return ar_dir / "model", info["seconds"]

    # -- the table ----------------------------------------------------------------------------------------------

    def flat(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """A cell's ``metrics.json`` as one row of the results table."""
        row: dict[str, Any] = {"status": metrics["status"], "error": ""}
        if self.generates:
            m = metrics["tokens_per_step"]
            row["tokens_per_step"] = m if isinstance(m, int) else "+".join(map(str, m))
        for name, (_, evaluator) in self.evaluators.items():
            result = metrics["evaluations"][name]
            for column in evaluator.columns:
                value = result.get(column)
                row[column] = round(value, 4) if isinstance(value, float) else ("" if value is None else value)
        sec = metrics["seconds"]
        row.update(ae_train_s=sec["ae_train"], wall_s=sec["wall"])
        if self.generates:
            row["ar_train_s"] = sec["ar_train"]
        return row

    def shown(self) -> list[str]:
        """The columns of ``results.md`` besides the cell and its status."""
        return ["tokens_per_step"] * self.generates + (self.matrix.metrics or [*self.headers, *self.times])

    def plots(self) -> list[tuple[str, str]]:
        return [(column, self.headers[column]) for _, e in self.evaluators.values() for column in e.plots]

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.out))

    def _run_notes(self) -> list[str]:
        b = self.budget
        steps = f"training steps capped at {self.steps}" if self.steps else "training steps as in each cell's preset"
        data = str(self.data) if self.data else f"the preset's dataset `{self.base.dataset.name}`"
        held = f"`{self.eval_data}`" if self.eval_data else f"the last {b.eval_images} items of the training data, held out of training"
        names = ", ".join(f"`{n}`" for n in self.evaluators)
        return [
            f"- base preset: `{self.matrix.base}`: {self.base.description}",
            f"- data: {data}; evaluated on {held}",
            f"- evaluators: {names}; {'quick' if self.quick else 'full'} budgets; {steps}"
            + (f"; latent cache of {b.latent_images} images" if self.generates else ""),
            *([f"- overrides of every cell: `{json.dumps(self.overrides, sort_keys=True)}`"] if self.overrides else []),
            *self.prepared.notes,
        ]

    def _say(self, line: str) -> None:
        if self.progress:
            print(line, flush=True)


# -- helpers ----------------------------------------------------------------------------------------------------


def _built(kind: str, spec: Any, protocol: type, method: str) -> Any:
    """A matrix's evaluator or preparation, built and checked against its protocol (an error names the plugin)."""
    component = plugins.registry().get(kind, spec.name)
    built = component.build(spec.options)
    if not isinstance(built, protocol):
        raise ConfigError(
            f"{kind} {spec.name!r} (plugin {component.plugin!r}) built a {type(built).__name__}, which lacks "
            f"`{method}` or an attribute of vgt_core.evaluators.{protocol.__name__}"
        )
    return built


def _check_split(items: int, held_out: int) -> None:
    if items <= held_out:
        raise ConfigError(
            f"the training data has {items} items: holding out {held_out} for the evaluators (--eval-images) "
            "leaves none to train on; lower --eval-images or pass --eval-data"
        )


def _with(context: EvalContext, **changes: Any) -> EvalContext:
    from dataclasses import replace

    return replace(context, **changes)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def digest(spec: Any, root: Path) -> str:
    """A short hash of ``spec`` that does not depend on where the output folder lives."""
    text = json.dumps(spec, sort_keys=True, default=str).replace(str(root), "<out>")
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def folder_name(label: str) -> str:
    """A cell label as a folder name (axes labels hold '=' and ',', which are kept)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)


# -- results ----------------------------------------------------------------------------------------------------


def write_results(out: Path, name: str, matrix: Matrix, rows: list[dict[str, Any]], columns: Sequence[str],
                  shown: Sequence[str], headers: dict[str, str], plots: Sequence[tuple[str, str]], notes: Sequence[str] = ()) -> None:  # fmt: skip
    """``results.csv`` (every column), ``results.md`` (the ``shown`` ones) and ``results.png`` (the ``plots``)."""
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})

    header = ["cell", "status", *({"tokens_per_step": "tok/step", **headers}.get(c, c) for c in shown)]
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
    plot_results(out / "results.png", name, rows, plots)


def _cell_text(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value) if value != "" else "-"


def plot_results(path: Path, name: str, rows: list[dict[str, Any]], plots: Sequence[tuple[str, str]]) -> Path:
    """One bar panel per plotted metric, a bar per cell; failed cells are marked, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["cell"] for row in rows]
    panels = max(1, len(plots))
    fig, axes = plt.subplots(1, panels, figsize=(max(10, 1.1 * len(labels) * panels), 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes[0], plots):
        values = [row.get(metric) if row["status"] == "ok" else None for row in rows]
        bars = ax.bar(range(len(labels)), [v if isinstance(v, (int, float)) else 0 for v in values], color="tab:blue")
        ax.bar_label(bars, [f"{v:.3g}" if isinstance(v, (int, float)) else "" for v in values], fontsize=7)
        for i, v in enumerate(values):
            if not isinstance(v, (int, float)):
                ax.text(i, 0, "failed" if rows[i]["status"] != "ok" else "n/a", rotation=90, ha="center", va="bottom",
                        fontsize=7, color="tab:red")  # fmt: skip
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"ablation {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
