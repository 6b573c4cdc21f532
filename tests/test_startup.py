"""Lazy plugin import: listing commands and presets imports no torch; lazily named components resolve when built,
and a reference that cannot be imported is an error naming the component and its plugin."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pydantic import BaseModel

from vgt_core import hookimpl
from vgt_core.errors import ConfigError
from vgt_core.plugins import list_components, registry
from vgt_core.registry import PluginImportError

HEAVY = ("torch", "torchvision", "transformers", "diffusers", "timm", "accelerate")

# Runs one `vgt` command in a fresh interpreter, then prints its exit status and the heavy modules it imported.
PROBE = """
import json, sys
from vgt_core.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exit:  # --help
    status = exit.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
print(json.dumps({{"status": status, "heavy": heavy}}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["plugins"], ["plugins", "--quiet"], ["presets"], ["presets", "show", "tiny-internvl3"]]
)
def test_listing_commands_import_no_torch(argv):
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"status": 0, "heavy": []}, result.stderr
    if argv == ["plugins"]:  # every built-in is listed, with its description, from the light modules alone
        assert "internvl3        vgt" in result.stdout and "QueryAR: position queries" in result.stdout


def test_every_registered_reference_resolves():
    """Each built-in registers "module:attr" strings; a typo there would surface only when that component is built."""
    for component in list_components():
        assert callable(component.factory), component.name
        assert issubclass(component.options, BaseModel), component.name
    lazy = {c.name for c in list_components() if isinstance(c.factory_ref, str)}
    assert {"internvl3", "qwen25vl-lm", "dcae", "dcae-encoder", "sdvae", "vit", "queryar", "mar"} <= lazy


def test_an_unimportable_reference_names_the_component_and_plugin(register_plugin):
    class Broken:
        @hookimpl
        def vgt_register_encoders(self, register):
            register("broken", "vgt_no_such_module.model:Encoder", description="an encoder whose module is missing")

    register_plugin(Broken(), "broken-plugin")
    component = registry().get("encoder", "broken")
    assert component.description == "an encoder whose module is missing"  # listed without importing anything
    with pytest.raises(PluginImportError, match=r"encoder 'broken' of plugin 'broken-plugin' .*its factory: cannot import "
                                                r"'vgt_no_such_module.model:Encoder': ModuleNotFoundError"):
        component.build({})


def test_a_malformed_reference_is_refused_when_registered(register_plugin):
    class Malformed:
        @hookimpl
        def vgt_register_decoders(self, register):
            register("malformed", "vgt_plugins.dcae.model.DCAEDecoder", description="a dot where the colon goes")

    register_plugin(Malformed(), "malformed-plugin")
    with pytest.raises(ConfigError, match=r"decoder 'malformed' of plugin 'malformed-plugin'.*write 'package.module:attribute'"):
        registry()
