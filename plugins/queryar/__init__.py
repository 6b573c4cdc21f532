"""QueryAR (paper §3.3): position queries interleaved with latents in a random order, decoded causally.
This module registers it and holds its options (no torch); the class is in ``model``, imported when built."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from vgt_core import hookimpl
from vgt_core.registry import Options


class QueryAROptions(Options):
    train_group_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        [1], min_length=1, description="query group sizes shown in training, one drawn per sample ([1] = upstream); each must divide the latent tokens"
    )
    train_order: Literal["random", "raster"] = Field("random", description="order of positions in training")
    position_ids: Literal["sequence", "grid"] = Field(
        "sequence",
        description="the LM's (RoPE) position of an image slot: its place in the sequence (upstream) or its place "
        "in the latent grid, as the VLM numbers image tokens when it reads an image",
    )


@hookimpl
def vgt_register_samplers(register):
    register(
        "queryar", "vgt_plugins.queryar.model:QueryAR", QueryAROptions,
        "QueryAR: position queries, random order, KV-cached parallel decoding",
    )
