"""The plugin's components pass vgt's contract tests (run: ``pytest test_vgt_llava.py`` with the plugin installed)."""

from vgt_core.testing import BackboneContract, EncoderContract
from vgt_llava import TINY


class TestLlavaEncoder(EncoderContract):
    name, options = "llava", {"config": TINY}


class TestLlavaBackbone(BackboneContract):
    name, options = "llava-lm", {"config": TINY, "tokenizer": "byte-level"}
