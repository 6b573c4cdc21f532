"""The shapes world's parts of ``vgt ablate`` (the runner itself is ``vgt_core.ablation``).

* ``shapes-understanding`` (a preparation): the base preset's tiny InternVL3 first learns to describe shapes, once
  per ablation (``OUT/shared/vlm-*``); every cell then loads its encoder and backbone from it. With ``--quick`` it
  also applies the demo's quick training steps.
* ``shapes-geneval`` (an evaluator of the generator): each cell generates for the held-out evaluation prompts at
  its own generation settings, and mini-GenEval scores the images.

Both are registered in ``vgt_shapes/__init__.py``, which imports this module only when they are built.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vgt_core.errors import ConfigError
from vgt_core.evaluators import EvalContext, Prepared, PrepareContext
from vgt_shapes import GenEvalOptions, UnderstandingOptions, demo
from vgt_shapes.world import TASKS, ShapesWorld


def _shapes_only(what: str, preset: Any) -> None:
    if preset.dataset is None or preset.dataset.name != "shapes":
        name = preset.dataset.name if preset.dataset is not None else None
        raise ConfigError(f"{what} works on the shapes world: the preset must train on the `shapes` dataset, not {name!r}")


class UnderstandingPreparation:
    """Pre-train the base preset's VLM on the shapes world, then point every cell's encoder and backbone at it."""

    def __init__(self, options: UnderstandingOptions):
        self.options = options

    def prepare(self, context: PrepareContext) -> Prepared:
        base = context.base
        if base.encoder.name != "internvl3" or not base.encoder.options.get("config"):
            raise ConfigError(
                f"shapes-understanding: matrices.{context.matrix}: the base preset must have an `internvl3` encoder with "
                "a `config`, like shapes-demo: that VLM is pre-trained on the shapes world first"
            )
        _shapes_only(f"shapes-understanding (matrices.{context.matrix})", base)
        steps = self.options.steps or demo.UNDERSTANDING_STEPS["quick" if context.quick else "full"]
        steps = min(steps, context.steps or steps)
        world = demo.world_of(base)
        spec = {"config": base.encoder.options["config"], "world": world.model_dump(), "steps": steps,
                "eval_images": self.options.eval_images}

        def pretrain(out: Path) -> dict[str, Any]:
            from vgt_shapes.understanding import pretrain_understanding

            result = pretrain_understanding(spec["config"], out, world=world, steps=steps, eval_images=spec["eval_images"],
                                            progress=context.progress)  # fmt: skip
            return {"before": result["before"], "after": result["after"]}

        vlm, info = context.artifact("vlm", spec, pretrain)
        after = info["after"]
        notes = [f"- understanding VLM, pre-trained {steps} steps on the shapes world: token accuracy "
                 f"{after['token_accuracy']:.3f}, descriptions fully right {after['exact_match']:.3f}"]
        return Prepared({**demo.understanding_overrides(vlm), **(demo.QUICK if context.quick else {})}, notes)


class GenEvalEvaluator:
    """mini-GenEval of the cell's generator: seeded images for the evaluation prompts, scored by ``scorer``."""

    needs = "generator"
    columns = {"geneval_overall": "GenEval", **{f"geneval_{task}": task for task in TASKS}, "gen_s_per_image": "s/image"}
    plots = ("geneval_overall", "gen_s_per_image")

    def __init__(self, options: GenEvalOptions):
        self.options = options

    def evaluate(self, context: EvalContext) -> dict[str, Any]:
        from vgt_core.pipeline import VGTPipeline
        from vgt_shapes.scorer import score_folder

        _shapes_only("shapes-geneval", context.preset)
        mode = "quick" if context.quick else "full"
        k = self.options.samples_per_prompt or demo.SAMPLES_PER_PROMPT[mode]
        per_task = self.options.prompts_per_task or demo.PROMPTS_PER_TASK[mode]
        prompts = ShapesWorld(image_size=demo.world_of(context.preset).image_size).evaluation_prompts(per_task=per_task)
        pipe = VGTPipeline.from_pretrained(context.generator, device=context.device)
        settings = context.preset.generation.model_dump(exclude={"seed"})
        seconds = demo.generate_geneval(pipe, prompts, k, context.folder, context.progress, **settings)
        scores = score_folder(context.folder)
        return {
            "geneval_overall": scores["overall"],
            **{f"geneval_{task}": scores["per_task"].get(task, math.nan) for task in TASKS},
            "gen_s_per_image": round(seconds / max(1, len(prompts) * k), 4),
            "generation_s": round(seconds, 1),
            "images": scores["images"],
        }
