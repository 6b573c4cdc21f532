"""Every registered component passes the contract tests of ``vgt_core.testing``, at the tiny size of the first
preset (or ablation-matrix cell) of the registry files that uses it."""

from __future__ import annotations

from typing import Any

import pytest

from vgt_core.config import apply_overrides, check_preset, load_presets
from vgt_core.plugins import list_components
from vgt_core.testing import BackboneContract, DecoderContract, EncoderContract, SamplerContract

KINDS = ("encoder", "decoder", "backbone", "sampler")


def tiny_specs() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> the spec of the first tiny preset, then matrix cell, that uses the component."""
    book = load_presets()
    presets = [book.preset(name) for name in book.names() if name.startswith("tiny")]
    for name, (matrix, source) in sorted(book.matrices.items()):
        for label, overrides in matrix.expand().items():
            presets.append(check_preset(apply_overrides(book.raw(matrix.base), overrides), source, f"{name}[{label}]"))
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for preset in presets:
        for kind in KINDS:
            spec = getattr(preset, kind)
            if spec is not None:
                found.setdefault((kind, spec.name), spec.model_dump())
    return found


SPECS = tiny_specs()


def specs(kind: str) -> list[Any]:
    return [pytest.param(SPECS.get((kind, c.name), {"name": c.name}), id=c.name) for c in list_components(kind)]


def test_every_registered_component_has_tiny_options():
    """A component no tiny preset or matrix uses would escape the contract tests: add one to registry.yaml."""
    missing = [f"{c.kind} {c.name!r}" for c in list_components() if c.kind in KINDS and (c.kind, c.name) not in SPECS]
    assert not missing, f"no tiny preset or matrix cell uses {missing}"


class TestEncoders(EncoderContract):
    @pytest.fixture(params=specs("encoder"))
    def spec(self, request):
        return request.param


class TestDecoders(DecoderContract):
    @pytest.fixture(params=specs("decoder"))
    def spec(self, request):
        return request.param


class TestBackbones(BackboneContract):
    @pytest.fixture(params=specs("backbone"))
    def spec(self, request):
        return request.param


class TestSamplers(SamplerContract):
    @pytest.fixture(params=specs("sampler"))
    def spec(self, request):
        return request.param


def test_a_sampler_sees_the_sampler_context_not_the_generator(monkeypatch):
    """Training and generation hand the sampler a ``SamplerContext``: nothing of the generator beyond it (no head,
    no options) is within its reach."""
    import torch

    from vgt_core.config import GenerationConfig
    from vgt_core.sampling import SamplerContext

    gen = SamplerContract().generator({"name": "queryar"})
    seen = []
    for method in ("training_targets", "generate"):
        original = getattr(gen.sampler, method)
        monkeypatch.setattr(gen.sampler, method, lambda ctx, *a, _f=original, **k: (seen.append(ctx), _f(ctx, *a, **k))[1])
    gen(torch.randn(2, gen.latent_channels, 1, 3), ["a", "b"])
    gen.generate(["a"], (1, 3), GenerationConfig(num_sampling_steps=1, seed=0))
    assert [type(ctx) for ctx in seen] == [SamplerContext, SamplerContext]
    assert not hasattr(seen[0], "head") and seen[0].backbone is gen.backbone and seen[0].latent_channels == gen.latent_channels
