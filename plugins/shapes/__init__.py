"""The shapes world: a toy text-to-image world small enough to run VGT end to end on a CPU.

``world`` renders images with GenEval-style captions and metadata, ``scorer`` is mini-GenEval (a colour/shape
detector with GenEval's rules). This module registers the world as the dataset ``shapes``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch.utils.data import Dataset

from vgt_core import hookimpl
from vgt_core.registry import Options
from vgt_plugins.shapes.world import TASKS, ShapesWorld


Task = Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]
assert set(Task.__args__) == set(TASKS)


class ShapesOptions(Options):
    image_size: int = Field(64, ge=32, le=448)
    size: int = Field(10_000, gt=0, description="number of samples (index i is a pure function of seed and i)")
    seed: int = 0
    tasks: list[Task] | None = Field(None, description="a subset of the six tasks (default: all, equal mix)")


class ShapesDataset(Dataset):
    """``size`` samples of the shapes world: ``{"image": PIL.Image, "caption": str, "metadata": dict}``."""

    def __init__(self, options: ShapesOptions):
        self.options = options
        self.world = ShapesWorld(image_size=options.image_size, seed=options.seed, tasks=options.tasks)

    def __len__(self) -> int:
        return self.options.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.world.sample(index)
        return {"image": sample.image, "caption": sample.caption, "metadata": sample.metadata}


@hookimpl
def vgt_register_datasets(register):
    register("shapes", ShapesDataset, ShapesOptions, "the shapes world: 1-4 flat objects, GenEval-style captions")
