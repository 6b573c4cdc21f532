"""``torch.compile`` (``VGTGenerator.compile``, ``train_ar.compile``, ``vgt generate --compile``): the compiled
language model and flow head compute what the eager ones do, in generation and in training, and they really run
compiled (dynamo's graph counter moves). Speed is measured in bench/ (docs/benchmarks.md#torchcompile-benchcompilepy), not here."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

from test_ar_learning import random_latents, small_preset, write_latent_cache
from test_generator import PROMPTS, randomize_head, tiny_generator
from vgt_core.compose import build_autoencoder
from vgt_core.config import GenerationConfig, check_preset
from vgt_core.pipeline import VGTPipeline
from vgt_core.training.autoregressive import train_generator


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts only its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend: dynamo's capture and AOT autograd as inductor gets them, without
    inductor's C++ builds (~50 s for the QueryAR test on a cold cache). Inductor itself runs in
    `vgt generate --compile` (test_cli_ar.py)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("sampler", ["queryar", "mar"])
def test_compiled_generation_equals_eager(sampler, aot_eager):
    gen = randomize_head(tiny_generator(sampler))
    names = list(gen.state_dict())
    configs = [GenerationConfig(tokens_per_step=m, num_sampling_steps=3, guidance_scale=2.0, seed=3) for m in (1, 4)]
    eager = [gen.generate(PROMPTS, (4, 4), c) for c in configs]
    gen.compile()
    compiled = [gen.generate(PROMPTS, (4, 4), c) for c in configs]
    assert compiled_graphs() >= 2  # the language model and the head, each compiled
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert list(gen.state_dict()) == names  # checkpoints of a compiled model load into an eager one


def test_train_ar_compile_trains_what_eager_trains(tmp_path, aot_eager):
    """Five steps of train_generator with train_ar.compile against the same run eager: the same weights (to float
    rounding), trained through the compiled parts."""
    p = small_preset()
    p["train_ar"].update(steps=5, batch_size=4, lr=1e-3, warmup_steps=0, ema_decay=None, sample_every=10**6,
                         checkpoint_every=10**6, log_every=1)  # fmt: skip
    build_autoencoder(check_preset(p, "test", "eager")).save_pretrained(tmp_path / "ae")
    write_latent_cache(tmp_path / "cache", random_latents(8), ["a red circle", "a blue square"] * 4)
    runs = {}
    for compiled in (False, True):
        p["train_ar"]["compile"] = compiled
        preset = check_preset(p, "test", str(compiled))
        model = train_generator(preset, tmp_path / "ae", tmp_path / f"run-{compiled}", data=tmp_path / "cache", progress=False)
        runs[compiled] = VGTPipeline.from_pretrained(model).generator.state_dict()
        if compiled:
            assert compiled_graphs() >= 2
        else:
            assert compiled_graphs() == 0
    for name, weight in runs[False].items():
        torch.testing.assert_close(runs[True][name], weight, atol=2e-5, rtol=1e-4, msg=name)
    moved = runs[True]["head.final.weight"].abs().sum()
    assert moved > 0  # zero at init: the compiled run trained the head
