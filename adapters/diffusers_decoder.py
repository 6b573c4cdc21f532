"""A diffusers autoencoder's decoder as a vgt ``Decoder``; the output is resized to the requested size.

VGT reads a 16x16 latent from a 448 px image (stride 28) while DC-AE upsamples 32x, so the decoder's
512 px output is resized to 448 px, as the released upstream code does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vgt_adapters.hf_common import PretrainedOptions, torch_dtype


class DiffusersDecoderOptions(PretrainedOptions):
    subfolder: str | None = Field(None, description="subfolder of `pretrained` holding the autoencoder")
    latent_channels: int = Field(32, gt=0)
    resize: Literal["bilinear", "bicubic", "nearest"] = "bilinear"


class DiffusersDecoder(nn.Module):
    """Base: subclasses set ``model_class`` and may adapt the loaded autoencoder in ``adapt``."""

    model_class: ClassVar[Any]

    def __init__(self, options: DiffusersDecoderOptions):
        super().__init__()
        latent_channels = options.latent_channels
        self.options = options
        if options.pretrained is not None and options.load_weights:
            ae = self.model_class.from_pretrained(
                options.pretrained, subfolder=options.subfolder, revision=options.revision, torch_dtype=torch.float32
            )
        else:
            if options.pretrained is not None:
                config = self.model_class.load_config(options.pretrained, subfolder=options.subfolder)
            elif options.config is not None:
                config = dict(options.config)
            else:
                raise ValueError("set `pretrained` (a hub id or folder) or `config` (the architecture)")
            ae = self.model_class.from_config(config)
        ae = self.adapt(ae, latent_channels)
        self.ae_config = dict(ae.config)
        self.decoder = ae.decoder  # the encoder half is dropped
        if options.dtype:
            self.decoder.to(torch_dtype(options.dtype))
        self.latent_channels = latent_channels
        self.upsample = self.native_upsample(self.ae_config)

    def adapt(self, ae: nn.Module, latent_channels: int) -> nn.Module:
        """Make the loaded autoencoder take ``latent_channels`` channels (identity by default)."""
        return ae

    def native_upsample(self, config: dict) -> int:
        raise NotImplementedError

    def forward(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.decoder(z)
        if tuple(x.shape[-2:]) != tuple(size):
            mode = self.options.resize
            x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=None if mode == "nearest" else False)
        return x

    def export(self, folder: Path) -> dict:
        config = {k: v for k, v in self.ae_config.items() if not k.startswith("_")}
        config["_class_name"] = self.model_class.__name__
        from vgt_core.serialization import write_json

        write_json(folder / "config.json", config)
        update = {"pretrained": ".", "subfolder": None, "config": None, "load_weights": False, "revision": None}
        return type(self.options).model_validate({**self.options.model_dump(), **update}).model_dump(mode="json")
