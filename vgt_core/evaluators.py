"""What ``vgt ablate`` scores a cell with, and what it prepares before the cells: two registered component kinds.

* An **evaluator** (kind ``evaluator``, hook ``vgt_register_evaluators``) scores one cell. With
  ``needs = "autoencoder"`` it scores the cell's VGT-AE, and its result is shared by every cell with the same
  autoencoder and held-out images; a matrix whose evaluators all need only the autoencoder trains no generator.
  With ``needs = "generator"`` the cell also caches latents, trains the AR model and hands the evaluator the
  pipeline, per cell (cells may differ in generation settings alone).
* A **preparation** (kind ``preparation``, hook ``vgt_register_preparations``) runs once per ablation before the
  cells and returns overrides applied to every cell: e.g. the shapes world pre-trains its tiny VLM on shapes
  first (``shapes-understanding``) and points the base preset's encoder and backbone at it.

Both are named in a matrix of ``registry.yaml`` (``evaluators:``, ``prepare:``). The core ships the evaluator
``reconstruction`` (PSNR, SSIM, rFID when Inception weights are on disk) for any images; see docs/ablations.md
for writing one. This module stays light (no torch at import): it is loaded to list components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, runtime_checkable

from pydantic import Field

from vgt_core.hookspecs import hookimpl
from vgt_core.registry import Options

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from vgt_core.config import Preset


@dataclass(frozen=True)
class EvalContext:
    """What an evaluator gets for one cell (or, with ``needs = "autoencoder"``, for one shared autoencoder)."""

    preset: "Preset"  # the cell's preset, generation settings included
    autoencoder: Path  # the final VGT-AE folder (``VGTAutoencoder.from_pretrained``)
    held_out: "Dataset"  # items {"image": PIL.Image, "caption": str} that no training step saw
    folder: Path  # the evaluator's own folder for anything it writes (images, per-prompt results)
    generator: Path | None = None  # the VGT pipeline folder (``VGTPipeline.from_pretrained``); needs == "generator"
    quick: bool = False  # ``--quick``: use smoke budgets
    progress: bool = True
    device: str = "cpu"


@runtime_checkable
class Evaluator(Protocol):
    """Scores a cell. ``columns`` maps each key ``evaluate`` returns for the results table to its header (other
    keys it returns are kept in the cell's ``metrics.json``); ``plots`` are the columns drawn in ``results.png``."""

    needs: Literal["autoencoder", "generator"]
    columns: dict[str, str]
    plots: tuple[str, ...]

    def evaluate(self, context: EvalContext) -> dict[str, Any]: ...


Artifact = Callable[[str, dict[str, Any], Callable[[Path], dict[str, Any]]], tuple[Path, dict[str, Any]]]


@dataclass(frozen=True)
class PrepareContext:
    """What a preparation gets: the matrix's base preset and the ablation's shared-artefact store."""

    base: "Preset"
    matrix: str
    # ``artifact(kind, spec, build)``: ``OUT/shared/<kind>-<hash of spec>``, built once by ``build(folder)`` (which
    # returns a JSON-able dict, kept with the spec in its ``done.json``) and reused by later runs.
    artifact: Artifact
    steps: int | None = None  # ``--steps``: cap every training phase at this many steps
    quick: bool = False
    progress: bool = True


@dataclass
class Prepared:
    """Dotted overrides applied to every cell (before the cell's own), and lines for ``results.md``."""

    overrides: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@runtime_checkable
class Preparation(Protocol):
    def prepare(self, context: PrepareContext) -> Prepared: ...


# -- the reconstruction evaluator ---------------------------------------------------------------------------------


class ReconstructionOptions(Options):
    images: int | None = Field(None, ge=1, description="score at most this many held-out images (default: all of them)")
    batch_size: int = Field(64, ge=1)
    inception_weights: str | None = Field(None, description="local pt_inception-2015-12-05 weights: rFID is computed too")


class ReconstructionEvaluator:
    """PSNR and SSIM (and rFID with ``inception_weights``) of the cell's VGT-AE on the held-out images."""

    needs = "autoencoder"
    plots = ("psnr", "ssim")

    def __init__(self, options: ReconstructionOptions):
        self.options = options
        self.columns = {"psnr": "PSNR", "ssim": "SSIM", **({"rfid": "rFID"} if options.inception_weights else {})}

    def evaluate(self, context: EvalContext) -> dict[str, Any]:
        import torch

        from vgt_core.autoencoder import VGTAutoencoder
        from vgt_core.data import collate, open_dataset
        from vgt_core.metrics import evaluate_reconstruction

        ae = VGTAutoencoder.from_pretrained(context.autoencoder, map_location=context.device)
        images = open_dataset(context.held_out, ae.image_size)
        loader = torch.utils.data.DataLoader(images, batch_size=self.options.batch_size, collate_fn=collate)
        result = evaluate_reconstruction(
            ae, loader, context.device, inception_weights=self.options.inception_weights,
            max_images=self.options.images, progress=context.progress,
        )  # fmt: skip
        if result["n_images"] == 0:
            raise ValueError(f"reconstruction: none of the {len(images)} held-out images is readable")
        return result


@hookimpl
def vgt_register_evaluators(register):
    register("reconstruction", ReconstructionEvaluator, ReconstructionOptions,
             "PSNR/SSIM (rFID with local Inception weights) of each cell's VGT-AE on held-out images of any dataset")
