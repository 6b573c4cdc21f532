"""vgt: turn a pretrained vision-language model into an image generator (Visual Generation Tuning).

The public surface: the plugin marker, the registry, the protocols, the model classes and the configs.
"""

from vgt_core.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
