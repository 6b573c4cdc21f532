"""Every extension point of vgt, in one place.

A plugin is a module (or object) with functions marked ``@vgt_core.hookimpl`` whose names match the specs
below. It is found through the entry-point group ``vgt`` (``[project.entry-points.vgt]`` in the plugin's
``pyproject.toml``); vgt's own components are registered the same way. A hook implementation may accept any
subset of a spec's arguments. A misspelled hook name is an error (``check_pending``), not silent dead code.

Catalog hooks receive a ``register`` callback instead of returning lists, so that the core owns duplicate
names and records which plugin provided what (shown by ``vgt plugins``).
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("vgt")
hookimpl = pluggy.HookimplMarker("vgt")

Register = Callable[..., None]

# ---------------------------------------------------------------------------------------------------------------
# Components: the four protocols of vgt_core.protocols, plus datasets (and, below, ablation evaluators).
# Each ``register(name, factory, options=OptionsModel, description="")`` call adds one named component.
# ``factory(options)`` receives an instance of ``options`` (a pydantic model, validated by the core before the
# call) and returns the component. ``options`` defaults to a model with no fields. ``factory`` and ``options`` may
# be ``"package.module:attribute"`` strings, imported on first validation or build, so that loading the plugin
# (every ``vgt`` command does) imports no torch; a lazy factory needs an explicit ``description``.
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def vgt_register_encoders(register: Register) -> None:
    """Register image encoders: a VLM's vision tower with its own preprocessing (protocol ``Encoder``).

    Called once, the first time the registry is needed.

    :param register: ``register(name, factory, options=None, description="")``.
    """


@hookspec
def vgt_register_decoders(register: Register) -> None:
    """Register pixel decoders that turn ``(B, C, h, w)`` latents into images (protocol ``Decoder``).

    :param register: ``register(name, factory, options=None, description="")``.
    """


@hookspec
def vgt_register_backbones(register: Register) -> None:
    """Register autoregressive backbones: a VLM's language model with its tokenizer (protocol ``ARBackbone``).

    :param register: ``register(name, factory, options=None, description="")``.
    """


@hookspec
def vgt_register_samplers(register: Register) -> None:
    """Register generation schemes (protocol ``Sampler``): how a training sequence is laid out and how
    latents are decoded at inference (QueryAR, MAR). A sampler sees the generator only through a
    ``vgt_core.sampling.SamplerContext`` and uses the helpers of ``vgt_core.sampling``.

    :param register: ``register(name, factory, options=None, description="")``.
    """


@hookspec
def vgt_register_datasets(register: Register) -> None:
    """Register datasets that can be named instead of a path (e.g. ``shapes`` for the toy world).

    ``factory(options)`` returns a map-style dataset whose items are ``{"image": PIL.Image, "caption": str}``.

    :param register: ``register(name, factory, options=None, description="")``.
    """


# ---------------------------------------------------------------------------------------------------------------
# Ablations (`vgt ablate`, vgt_core.evaluators): what a cell is scored with, and what runs once before the cells.
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def vgt_register_evaluators(register: Register) -> None:
    """Register evaluators that score an ablation cell (protocol ``vgt_core.evaluators.Evaluator``), e.g.
    ``reconstruction`` (the core's) or ``shapes-geneval`` (the shapes world's mini-GenEval).

    :param register: ``register(name, factory, options=None, description="")``.
    """


@hookspec
def vgt_register_preparations(register: Register) -> None:
    """Register steps run once before an ablation's cells (protocol ``vgt_core.evaluators.Preparation``), whose
    overrides apply to every cell, e.g. ``shapes-understanding`` (pre-train the toy VLM on the shapes world).

    :param register: ``register(name, factory, options=None, description="")``.
    """


# ---------------------------------------------------------------------------------------------------------------
# Presets: named pairings (encoder, decoder, backbone, sampler, training recipe) beside those of registry.yaml.
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def vgt_register_presets(register: Register) -> None:
    """Register presets shipped by a plugin (for example a tiny preset of a new VLM for its tests).

    :param register: ``register(name, preset)`` where ``preset`` is a dict in the layout of a
        ``registry.yaml`` preset; it is validated like one, and may extend any preset (``base: NAME``) and use any
        block (``use: NAME``) of the registry files, as their presets may extend it.
    """


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


@hookspec
def vgt_add_commands(subparsers, command) -> None:
    """Add sub-commands to ``vgt`` (the toy world adds ``demo`` and ``eval-shapes``).

    :param subparsers: the ``argparse`` sub-parsers object; call ``subparsers.add_parser(name, ...)``.
    :param command: a decorator ``command(name)(fn)`` that binds ``fn(args)`` to the sub-command ``name``.
    """
