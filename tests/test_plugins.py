"""The plugin system: discovery, provenance, duplicate and unknown names, strict hooks, the env switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pluggy
import pytest
import torch
from torch import nn

from vgt_core import hookimpl
from vgt_core.errors import ConfigError, UnknownComponentError
from vgt_core.plugins import list_components, registry
from vgt_core.registry import Options

BUILTIN = {
    ("encoder", "internvl3"),
    ("encoder", "qwen25vl"),
    ("encoder", "dcae-encoder"),
    ("decoder", "dcae"),
    ("decoder", "sdvae"),
    ("decoder", "vit"),
    ("backbone", "internvl3-lm"),
    ("backbone", "qwen25vl-lm"),
    ("sampler", "queryar"),
    ("sampler", "mar"),
}


def vgt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vgt_core.cli", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_builtins_come_through_entry_points_with_their_package():
    found = {(c.kind, c.name): c for c in list_components()}
    assert BUILTIN <= set(found)
    assert {found[k].package for k in BUILTIN} == {"vgt"}


def test_cli_plugins_json_lists_every_component():
    result = vgt("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert BUILTIN <= {(r["kind"], r["name"]) for r in rows}
    assert all({"kind", "name", "package", "version"} <= set(r) for r in rows)


def test_unknown_name_lists_known_ones_closest_first():
    with pytest.raises(UnknownComponentError) as err:
        registry().get("encoder", "internvl")
    message = str(err.value)
    assert "unknown encoder 'internvl'" in message
    assert message.index("internvl3") < message.index("qwen25vl")


class _EchoOptions(Options):
    width: int = 8


class _EchoEncoder(nn.Module):
    """A throwaway encoder: mean-pools 8x8 patches."""

    def __init__(self, options: _EchoOptions):
        super().__init__()
        self.feature_dim, self.image_size = options.width, 64
        self.proj = nn.Linear(3, options.width)

    def grid(self, image_size):
        size = image_size if isinstance(image_size, int) else image_size[0]
        return (size // 8, size // 8)

    def forward(self, images):
        pooled = torch.nn.functional.avg_pool2d(images, 8).flatten(2).transpose(1, 2)
        return self.proj(pooled)


class EchoPlugin:
    @hookimpl
    def vgt_register_encoders(self, register):
        register("echo", _EchoEncoder, _EchoOptions)


def test_a_registered_plugin_builds_with_validated_options(register_plugin):
    register_plugin(EchoPlugin(), name="echo-plugin")
    component = registry().get("encoder", "echo")
    assert component.plugin == "echo-plugin"
    assert component.build({"width": 4}).feature_dim == 4
    with pytest.raises(ConfigError, match="widht: unknown key .widht.; allowed keys: width"):
        component.build({"widht": 4})


def test_duplicate_names_are_refused_naming_both_providers(register_plugin):
    class Clash:
        @hookimpl
        def vgt_register_decoders(self, register):
            register("dcae", _EchoEncoder)

    register_plugin(Clash(), name="clash")
    with pytest.raises(ConfigError, match="'dcae' is registered twice: by plugin '(dcae|clash)'.*by plugin '(dcae|clash)'") as err:
        registry()
    assert "'dcae'" in str(err.value).split("twice")[1] and "'clash'" in str(err.value)


def test_a_misspelled_hook_fails_loudly(register_plugin):
    class Typo:
        @hookimpl
        def vgt_register_encoder(self, register):  # missing 's'
            pass

    with pytest.raises(pluggy.PluginValidationError, match="vgt_register_encoder"):
        register_plugin(Typo(), name="typo")
    from vgt_core.plugins import plugin_manager

    # The failed registration leaves nothing behind: no plugin, no spec-less hook.
    assert not plugin_manager().has_plugin("typo")
    assert not hasattr(plugin_manager().hook, "vgt_register_encoder")


def test_env_switch_restricts_which_plugins_load():
    only = vgt("plugins", "--json", env={"VGT_LOAD_PLUGINS": "dcae,queryar"})
    assert only.returncode == 0, only.stderr
    core = {("evaluator", "reconstruction")}  # the core's own component, not a plugin's: always there
    assert {(r["kind"], r["name"]) for r in json.loads(only.stdout)} == {("decoder", "dcae"), ("sampler", "queryar")} | core
    none = vgt("plugins", "--json", env={"VGT_LOAD_PLUGINS": ""})
    assert [((r["kind"], r["name"]), r["package"]) for r in json.loads(none.stdout)] == [(("evaluator", "reconstruction"), "vgt")]
    bad = vgt("plugins", env={"VGT_LOAD_PLUGINS": "dcea"})
    assert bad.returncode != 0 and "unknown plugin 'dcea'; known: dcae" in bad.stderr


def test_every_hook_is_documented_with_its_signature():
    """docs/plugins.md carries a heading and the exact signature of every hook."""
    from pathlib import Path

    from vgt_core.plugins import plugin_manager

    docs = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    for name in dir(plugin_manager().hook):
        if name.startswith("vgt_"):
            caller = getattr(plugin_manager().hook, name)
            assert f"{name}({', '.join(caller.spec.argnames)})" in docs, name


def test_registration_goes_through_pluggy_so_tracing_sees_it():
    """Hooks are called through pluggy's callers (not the implementation functions directly): VGT_TRACE_PLUGINS
    shows every plugin's registration call."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "VGT_TRACE_PLUGINS": "1"}
    done = subprocess.run([sys.executable, "-c", "from vgt_core.plugins import registry; registry()"],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for hook in ("vgt_register_encoders", "vgt_register_decoders", "vgt_register_backbones", "vgt_register_samplers"):
        assert hook in done.stderr


def test_hook_implementations_may_take_a_subset_of_the_arguments(register_plugin):
    """pluggy passes an implementation only the arguments it names (here: none of ``register``)."""
    calls = []

    class Quiet:
        @hookimpl
        def vgt_register_encoders(self):
            calls.append("called")

    register_plugin(Quiet(), name="quiet")
    registry()
    assert calls == ["called"]


@pytest.mark.parametrize(("marks", "expected"), [
    (({"tryfirst": True}, {}), ("a", "b")),  # a is registered first: without tryfirst it would be called last
    (({}, {}), ("b", "a")),                  # pluggy's default: the plugin registered last is called first
    (({}, {"trylast": True}), ("a", "b")),   # b is registered last: without trylast it would be called first
])  # fmt: skip
def test_registration_follows_pluggys_tryfirst_and_trylast(register_plugin, marks, expected):
    """Plugins a then b both register "dup": whichever pluggy calls first has it, the duplicate error says so."""

    def plugin(hook_marks):
        class Dup:
            @hookimpl(**hook_marks)
            def vgt_register_encoders(self, register):
                register("dup", _EchoEncoder, _EchoOptions)

        return Dup()

    register_plugin(plugin(marks[0]), name="a")
    register_plugin(plugin(marks[1]), name="b")
    with pytest.raises(ConfigError, match=f"'dup' is registered twice: by plugin '{expected[0]}'.*by plugin '{expected[1]}'"):
        registry()


def test_a_component_that_breaks_its_protocol_is_refused_at_build_naming_the_plugin(register_plugin):
    class WrongGrid(_EchoEncoder):
        def grid(self, image_size):
            return (2, 2)  # the features are 8x8-pooled: grid(64) is 8x8, not 2x2

    class NoGrid(nn.Module):
        feature_dim, image_size = 8, 64

        def forward(self, images):
            return images

    class Broken:
        @hookimpl
        def vgt_register_encoders(self, register):
            register("wrong-grid", WrongGrid, _EchoOptions)
            register("no-grid", lambda options: NoGrid())

    register_plugin(Broken(), name="broken")
    from vgt_core.errors import ContractError

    with pytest.raises(ContractError, match=r"encoder 'wrong-grid' of plugin 'broken'.*shape \(1, 64, 8\), but grid\(\(64, 64\)\) = \(2, 2\)"):
        registry().build("encoder", "wrong-grid")
    with pytest.raises(ContractError, match=r"encoder 'no-grid' of plugin 'broken'.*lacks grid of the Encoder protocol"):
        registry().build("encoder", "no-grid")


def test_a_decoder_or_backbone_of_the_wrong_size_is_refused_at_build(register_plugin):
    class HalfSizeDecoder(nn.Module):
        latent_channels, upsample = 4, 8

        def forward(self, z, size):
            return torch.zeros(z.shape[0], 3, size[0] // 2, size[1] // 2)

    class NarrowBackbone(nn.Module):
        hidden_size = 16  # but it embeds and computes 8 wide

        def embed_prompts(self, prompts, max_tokens=None):
            return torch.zeros(len(prompts), 2, 8), torch.ones(len(prompts), 2, dtype=torch.long)

        def forward(self, inputs_embeds, attention_mask, position_ids, cache=None):
            return inputs_embeds, cache

        def new_cache(self):
            return None

    class Sizes:
        @hookimpl
        def vgt_register_decoders(self, register):
            register("half", lambda options: HalfSizeDecoder())

        @hookimpl
        def vgt_register_backbones(self, register):
            register("narrow", lambda options: NarrowBackbone())

    register_plugin(Sizes(), name="sizes")
    from vgt_core.errors import ContractError

    with pytest.raises(ContractError, match=r"decoder 'half' of plugin 'sizes'.*gives \(1, 3, 8, 12\), not \(1, 3, 16, 24\)"):
        registry().build("decoder", "half")
    with pytest.raises(ContractError, match=r"backbone 'narrow' of plugin 'sizes'.*embeddings \(1, 2, 8\).*hidden_size = 16"):
        registry().build("backbone", "narrow")
