"""The shapes world: a toy text-to-image world small enough to run VGT end to end on a CPU.

``world`` renders images with GenEval-style captions and metadata, ``scorer`` is mini-GenEval (a colour/shape
detector with GenEval's rules). This module registers the world as the dataset ``shapes``, mini-GenEval as the
ablation evaluator ``shapes-geneval`` and the VLM's pre-training as the ablation preparation
``shapes-understanding`` (``vgt_shapes.ablation``; ``vgt ablate`` is the core's).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from vgt_core import hookimpl
from vgt_core.registry import Options
from vgt_shapes.world import MAX_OBJECT_FRAC, OBJECT_FRAC, TASKS, ShapesWorld


Task = Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]
assert set(Task.__args__) == set(TASKS)


class ShapesOptions(Options):
    image_size: int = Field(64, ge=32, le=448)
    size: int = Field(10_000, gt=0, description="number of samples (index i is a pure function of seed and i)")
    seed: int = 0
    tasks: list[Task] | None = Field(None, description="a subset of the six tasks (default: all, equal mix)")
    min_object_frac: float = Field(OBJECT_FRAC[0], gt=0, le=MAX_OBJECT_FRAC, description="smallest object box, a fraction of the side")
    max_object_frac: float = Field(OBJECT_FRAC[1], gt=0, le=MAX_OBJECT_FRAC, description="largest object box; four must fit")

    @model_validator(mode="after")
    def _sizes_in_order(self) -> ShapesOptions:
        if self.min_object_frac > self.max_object_frac:
            raise ValueError(f"min_object_frac ({self.min_object_frac}) must not exceed max_object_frac ({self.max_object_frac})")
        return self

    def world(self, seed: int | None = None) -> ShapesWorld:
        """The world these options describe, with another ``seed`` if given (e.g. held-out images)."""
        return ShapesWorld(
            image_size=self.image_size,
            seed=self.seed if seed is None else seed,
            tasks=self.tasks,
            min_object_frac=self.min_object_frac,
            max_object_frac=self.max_object_frac,
        )


class ShapesDataset:
    """``size`` samples of the shapes world: ``{"image": PIL.Image, "caption": str, "metadata": dict}``.

    A map-style dataset by protocol (``__len__``, ``__getitem__``), which is all ``DataLoader`` needs: subclassing
    torch's ``Dataset`` would import torch whenever ``vgt`` loads its plugins."""

    def __init__(self, options: ShapesOptions):
        self.options = options
        self.world = options.world()

    def __len__(self) -> int:
        return self.options.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.world.sample(index)
        return {"image": sample.image, "caption": sample.caption, "metadata": sample.metadata}


@hookimpl
def vgt_register_datasets(register):
    register("shapes", ShapesDataset, ShapesOptions, "the shapes world: 1-4 flat objects, GenEval-style captions")


class GenEvalOptions(Options):
    samples_per_prompt: int | None = Field(None, ge=1, description="images per prompt (default: the demo's 8; --quick: 1)")
    prompts_per_task: int | None = Field(None, ge=1, description="evaluation prompts per task (default: every one; --quick: 2)")


class UnderstandingOptions(Options):
    steps: int | None = Field(None, ge=1, description="pre-training steps (default: the demo's 800; --quick: 10)")
    eval_images: int = Field(256, ge=1, description="held-out images its description accuracy is measured on")


@hookimpl
def vgt_register_evaluators(register):
    # imported only when an ablation builds it
    register("shapes-geneval", "vgt_shapes.ablation:GenEvalEvaluator", GenEvalOptions,
             "mini-GenEval of each cell's generator on the shapes world's prompts")


@hookimpl
def vgt_register_preparations(register):
    register("shapes-understanding", "vgt_shapes.ablation:UnderstandingPreparation", UnderstandingOptions,
             "pre-train the base preset's tiny VLM to describe shapes once; every cell's encoder/backbone loads it")


@hookimpl
def vgt_add_commands(subparsers, command):
    p = subparsers.add_parser("demo", help="the whole method on the toy world (CPU, minutes)")
    p.add_argument("--out", required=True, help="a new or empty folder for every artifact, metrics.json and report.md")
    p.add_argument("--quick", action="store_true", help="a 1-minute smoke run with tiny budgets")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    command("demo")(_demo)

    p = subparsers.add_parser("eval-shapes", help="mini-GenEval: score a folder in GenEval's layout")
    p.add_argument("folder")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    command("eval-shapes")(_eval_shapes)


def _demo(args) -> None:
    from vgt_shapes.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick, progress=not args.quiet)
    rec = metrics["reconstruction"]
    understood = metrics["understanding"]["after"]
    print(f"\nunderstanding: token accuracy {understood['token_accuracy']:.3f}  "
          f"(shape words {understood['shape_accuracy']:.2f}, colour words {understood['color_accuracy']:.2f})")
    print(f"reconstruction: PSNR {rec['psnr']:.2f} dB  SSIM {rec['ssim']:.4f}")
    for key, result in metrics["generation"].items():
        tasks = "  ".join(f"{t} {v:.2f}" for t, v in result["geneval"].items())
        print(f"{key}: overall {result['overall']:.3f}  ({tasks})")
    targets = metrics["targets"]
    missed = [f"{name} (measured {t['measured']}, goal {t['target']})" for name, t in targets.items() if not t["met"]]
    scope = " (a --quick run; the targets are the full demo's)" if args.quick else ""
    print(f"targets{scope}: " + ("all met" if not missed else "NOT met: " + "; ".join(missed)))
    print(f"total {metrics['seconds']['total']:.0f} s; report: {args.out}/report.md")


def _eval_shapes(args) -> None:
    import json

    from vgt_shapes.scorer import score_folder

    scores = score_folder(args.folder)
    if args.json:
        print(json.dumps({k: v for k, v in scores.items() if k != "per_prompt"}, indent=2))
        return
    for task, accuracy in scores["per_task"].items():
        print(f"{task:14} {accuracy:.3f}")
    print(f"{'overall':14} {scores['overall']:.3f}   ({scores['images']} images, unreadable {scores['unreadable']})")
