"""The plugin's components pass vgt's contract tests (run: ``pytest test_vgt_smolvlm.py`` with the plugin installed)."""

from vgt_core.testing import BackboneContract, EncoderContract
from vgt_smolvlm import TINY


class TestSmolVLMEncoder(EncoderContract):
    name, options = "smolvlm", {"config": TINY}


class TestSmolVLMBackbone(BackboneContract):
    name, options = "smolvlm-lm", {"config": TINY, "tokenizer": "byte-level"}
