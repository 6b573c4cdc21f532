"""One gradient-checkpointing switch: every component recomputes its own activations, gradients unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import builtin_preset
from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.checkpointing import enable_gradient_checkpointing
from vgt_core.plugins import registry
from vgt_core.protocols import SupportsGradientCheckpointing


def _tiny_ae(decoder: dict) -> VGTAutoencoder:
    preset = builtin_preset("tiny-internvl3")
    torch.manual_seed(0)
    return VGTAutoencoder.from_specs(preset["encoder"], decoder).train()


def _grads_and_calls(ae: VGTAutoencoder, images: torch.Tensor, counted: torch.nn.Module) -> tuple[dict, int]:
    """Gradients of a reconstruction loss, and how many times ``counted`` ran forward in one step."""
    calls = []
    hook = counted.register_forward_hook(lambda *_: calls.append(1))
    ae.zero_grad()
    (ae(images)["reconstruction"] - images).square().mean().backward()
    hook.remove()
    return {n: p.grad.clone() for n, p in ae.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("decoder", ["dcae", "sdvae"])
def test_checkpointed_ae_has_the_same_gradients_and_recomputes_its_blocks(decoder, images):
    if decoder == "dcae":
        spec = builtin_preset("tiny-internvl3")["decoder"]
        inner = lambda ae: ae.decoder.decoder.up_blocks[1][1].conv1  # noqa: E731  a layer inside one up block
    else:
        spec = {"name": "sdvae", "options": {"config": {"block_out_channels": [16, 32], "layers_per_block": 1,
                                                        "norm_num_groups": 8, "latent_channels": 4,
                                                        "down_block_types": ["DownEncoderBlock2D"] * 2,
                                                        "up_block_types": ["UpDecoderBlock2D"] * 2}}}
        inner = lambda ae: ae.decoder.decoder.up_blocks[0].resnets[0].conv1  # noqa: E731
    plain = _tiny_ae(spec)
    checkpointed = copy.deepcopy(plain)
    assert enable_gradient_checkpointing(checkpointed) == ["encoder", "decoder"]

    expected, plain_calls = _grads_and_calls(plain, images, inner(plain))
    got, checkpointed_calls = _grads_and_calls(checkpointed, images, inner(checkpointed))
    assert (plain_calls, checkpointed_calls) == (1, 2)  # run again in the backward pass: the block was checkpointed
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the encoder's transformer layers use transformers' own switch
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.encoder.tower.modules())
    # without gradients nothing is recomputed and the state dict keeps its keys
    with torch.no_grad():
        calls = []
        hook = inner(checkpointed).register_forward_hook(lambda *_: calls.append(1))
        checkpointed(images)
        hook.remove()
    assert len(calls) == 1
    assert list(checkpointed.state_dict()) == list(plain.state_dict())


def test_every_builtin_vlm_and_decoder_component_supports_it():
    reg = registry()
    for kind, name in [("encoder", "internvl3"), ("encoder", "qwen25vl"), ("encoder", "dcae-encoder"),
                       ("backbone", "internvl3-lm"), ("backbone", "qwen25vl-lm"),
                       ("decoder", "dcae"), ("decoder", "sdvae"), ("decoder", "vit")]:
        factory = reg.get(kind, name).factory
        assert issubclass(factory, SupportsGradientCheckpointing) or hasattr(factory, "enable_gradient_checkpointing"), name


def test_backbone_switch_reaches_the_language_model():
    preset = builtin_preset("tiny-qwen25vl")
    backbone = registry().build("backbone", preset["backbone"]["name"], preset["backbone"]["options"])
    assert not backbone.lm.is_activation_checkpointing
    assert enable_gradient_checkpointing(backbone) == [""]
    assert backbone.lm.is_activation_checkpointing


def test_a_model_with_no_supporting_component_warns():
    with pytest.warns(UserWarning, match="no component"):
        assert enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []
