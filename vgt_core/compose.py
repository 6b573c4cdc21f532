"""Composition: the model objects of a preset, or of components named in Python without any YAML.

    from vgt_core.compose import build
    ae, gen = build("tiny-internvl3")                       # a preset of registry.yaml
    ae, gen = build("tiny-mine", registry="my-registry.yaml")  # or of an extra registry file (or a list of them)
    ae, gen = build(Preset(encoder={"name": "qwen25vl", ...}, decoder=..., backbone=..., sampler=...))

Any autoencoder pairs with any backbone: they meet only at the latent (channels + normalisation).
"""

from __future__ import annotations

from vgt_core.autoencoder import VGTAutoencoder
from vgt_core.config import Preset, RegistryFiles, check_preset, load_presets
from vgt_core.generator import VGTGenerator


def resolve(preset: str | Preset | dict, registry: RegistryFiles = None) -> Preset:
    """A preset by name (registry.yaml, ``VGT_REGISTRY``, ``registry`` files and plugins), or validated from a
    ``Preset``/dict."""
    if isinstance(preset, str):
        return load_presets(registry).preset(preset)
    data = preset.model_dump(mode="json") if isinstance(preset, Preset) else preset
    return check_preset(data, "<python>", "preset")


def build_autoencoder(preset: str | Preset | dict, registry: RegistryFiles = None) -> VGTAutoencoder:
    preset = resolve(preset, registry)
    return VGTAutoencoder.from_specs(preset.encoder.model_dump(), preset.decoder.model_dump(), image_size=preset.image_size)


def build_generator(preset: str | Preset | dict, autoencoder: VGTAutoencoder, registry: RegistryFiles = None) -> VGTGenerator:
    """The preset's backbone and sampler around ``autoencoder``'s latent."""
    preset = resolve(preset, registry)
    if preset.backbone is None or preset.sampler is None:
        raise ValueError("the preset names no backbone/sampler: it cannot build a generator")
    return VGTGenerator.from_specs(
        preset.backbone.model_dump(),
        preset.sampler.model_dump(),
        latent_channels=autoencoder.latent_channels,
        latent_norm=autoencoder.latent_norm.kind,
        options=preset.generator,
    )


def build(preset: str | Preset | dict, registry: RegistryFiles = None) -> tuple[VGTAutoencoder, VGTGenerator | None]:
    """Both halves of a preset (the generator is None when it names no backbone); ``registry``: extra registry
    files (a path or a list) besides the built-in one and ``VGT_REGISTRY``."""
    preset = resolve(preset, registry)
    ae = build_autoencoder(preset)
    return ae, build_generator(preset, ae) if preset.backbone is not None else None
