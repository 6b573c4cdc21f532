"""MAR (Li et al., 2024, arXiv 2406.11838) on the VLM's language model: the paper's baseline (Table 8).
This module registers it and holds its options (no torch); the class is in ``model``, imported when built."""

from __future__ import annotations

from pydantic import Field

from vgt_core import hookimpl
from vgt_core.registry import Options


class MAROptions(Options):
    mask_ratio_min: float = Field(0.7, ge=0, le=1, description="lower bound of the training mask ratio")
    mask_ratio_std: float = Field(0.25, gt=0, description="spread of the truncated normal (mean 1.0)")


@hookimpl
def vgt_register_samplers(register):
    register(
        "mar", "vgt_plugins.mar.model:MAR", MAROptions,
        "MAR baseline: bidirectional masked prediction, cosine schedule",
    )
