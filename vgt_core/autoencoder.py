"""VGT-AE (paper §3.2): a VLM's vision encoder, a residual projection to a few channels, a pixel decoder.

    images (B,3,H,W) in [-1,1] -> Encoder -> f (B, N, d) -> projection phi -> z (B, C, h, w)
        -> [latent norm, + noise a*eps with a ~ U[0, sigma] while training] -> Decoder -> images
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vgt_core.config import LatentNorm
from vgt_core.randomness import Draws, GlobalDraws
from vgt_core.serialization import WEIGHTS_NAME, atomic_folder, load_weights, read_model_config, write_model_folder

FORMAT = "vgt-autoencoder"


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


class ResidualBlock(nn.Module):
    """x + MLP(x), MLP = LayerNorm -> Linear -> GELU -> Linear, at the feature width."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class ResidualProjection(nn.Module):
    """phi: feature width d -> C latent channels; the released upstream layout (3 residual blocks, then
    LayerNorm -> Linear(d, C) -> GELU -> Linear(C, C))."""

    def __init__(self, feature_dim: int, channels: int, blocks: int = 3):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualBlock(feature_dim) for _ in range(blocks)))
        self.down = nn.Sequential(
            nn.LayerNorm(feature_dim), nn.Linear(feature_dim, channels), nn.GELU(), nn.Linear(channels, channels)
        )
        self.apply(_init_linear)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.down(self.blocks(features))


class LatentNormalizer(nn.Module):
    """Normalisation of the latent before noise and decoding (stage 2).

    ``layernorm``: over the C channels at each position, no affine, eps 1e-6 (the released upstream code).
    ``batchnorm``: per channel over the batch with running estimates used at inference (the paper's text).
    ``none``: identity (stage 1).
    """

    def __init__(self, kind: LatentNorm, channels: int):
        super().__init__()
        self.kind = kind
        self.channels = channels
        self.bn = nn.BatchNorm2d(channels, affine=False, eps=1e-6) if kind == "batchnorm" else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(z.movedim(1, -1), (self.channels,), eps=1e-6).movedim(-1, 1)
        if self.kind == "batchnorm":
            return self.bn(z)
        return z

    def renormalize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Put sampled latent tokens ``(..., C)`` back on the AE's latent manifold before they are fed back
        to the LM or decoded. Only per-token normalisation can be re-applied to a single token."""
        if self.kind == "layernorm":
            return F.layer_norm(tokens, (self.channels,), eps=1e-6)
        return tokens


class VGTAutoencoder(nn.Module):
    """Encoder + phi + latent normalisation + decoder, saved as one folder (``save_pretrained``)."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        encoder_spec: dict,
        decoder_spec: dict,
        image_size: int | None = None,
        latent_norm: LatentNorm = "none",
        noise_sigma: float = 0.0,
    ):
        super().__init__()
        latent_channels = decoder.latent_channels
        self.encoder = encoder
        self.projection = ResidualProjection(encoder.feature_dim, latent_channels)
        self.latent_norm = LatentNormalizer(latent_norm, latent_channels)
        self.decoder = decoder
        self.encoder_spec = encoder_spec
        self.decoder_spec = decoder_spec
        self.latent_channels = latent_channels
        self.image_size = image_size or encoder.image_size
        self.noise_sigma = noise_sigma

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_specs(
        cls,
        encoder: dict,
        decoder: dict,
        *,
        image_size: int | None = None,
        latent_norm: LatentNorm = "none",
        noise_sigma: float = 0.0,
    ) -> VGTAutoencoder:
        """Build from component specs ``{"name": ..., "options": {...}}`` through the plugin registry."""
        from vgt_core.plugins import registry

        reg = registry()
        enc = reg.build("encoder", encoder["name"], encoder.get("options"))
        dec = reg.build("decoder", decoder["name"], decoder.get("options"))
        return cls(
            enc,
            dec,
            encoder_spec=dict(encoder),
            decoder_spec=dict(decoder),
            image_size=image_size,
            latent_norm=latent_norm,
            noise_sigma=noise_sigma,
        )

    def set_latent_regularization(self, norm: LatentNorm, noise_sigma: float) -> None:
        """Switch the latent normalisation and training noise (stage 1 -> stage 2)."""
        if norm != self.latent_norm.kind:
            device = next(self.parameters()).device
            self.latent_norm = LatentNormalizer(norm, self.latent_channels).to(device)
        self.noise_sigma = noise_sigma

    # -- the method ---------------------------------------------------------------------------------------------

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid(self.image_size)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The VLM's own visual features ``(B, N, d)`` (what self-distillation compares)."""
        return self.encoder(images)

    def project(self, features: torch.Tensor, grid: tuple[int, int], draws: Draws | None = None) -> torch.Tensor:
        """phi, normalisation and (in training mode) noise, drawn from ``draws`` (per sample in training):
        features -> latents ``(B, C, h, w)``."""
        b = features.shape[0]
        z = self.projection(features).transpose(1, 2).reshape(b, self.latent_channels, *grid)
        z = self.latent_norm(z)
        if self.training and self.noise_sigma > 0:
            draws = draws if draws is not None else GlobalDraws()
            owner = draws.per_sample(b)
            alpha = draws.rand(owner, 1, 1, 1, device=z.device, dtype=z.dtype) * self.noise_sigma
            z = z + alpha * draws.randn(owner, *z.shape[1:], device=z.device, dtype=z.dtype)
        return z

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``(B, 3, H, W)`` -> latents ``(B, C, h, w)``."""
        return self.project(self.features(images), self.encoder.grid(images.shape[-2:]))

    def decode(self, z: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Latents -> images in [-1, 1]; by default at the size the encoder would have read them from."""
        if size is None:
            gh, gw = self.grid
            size = (z.shape[-2] * self.image_size // gh, z.shape[-1] * self.image_size // gw)
        return self.decoder(z, size)

    def forward(self, images: torch.Tensor, draws: Draws | None = None) -> dict[str, torch.Tensor]:
        features = self.features(images)
        z = self.project(features, self.encoder.grid(images.shape[-2:]), draws)
        return {"reconstruction": self.decoder(z, tuple(images.shape[-2:])), "latents": z, "features": features}

    # -- persistence --------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "encoder": self.encoder_spec,
            "decoder": self.decoder_spec,
            "image_size": self.image_size,
            "latent_norm": self.latent_norm.kind,
            "noise_sigma": self.noise_sigma,
        }

    def save_pretrained(self, folder: str | os.PathLike, *, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``config.json``, ``model.safetensors`` and each component's offline config, atomically;
        ``state`` replaces the module's own weights (gathered from a sharded run)."""
        with atomic_folder(folder) as tmp:
            self.write_into(tmp, state=state)

    def write_into(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        write_model_folder(folder, self, self.config(), {"encoder": self.encoder, "decoder": self.decoder}, state=state)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> VGTAutoencoder:
        """Rebuild from a folder written by ``save_pretrained``; nothing is downloaded."""
        folder = Path(folder)
        config, specs = read_model_config(folder, FORMAT, "VGT autoencoder", ("encoder", "decoder"))
        model = cls.from_specs(
            specs["encoder"],
            specs["decoder"],
            image_size=config["image_size"],
            latent_norm=config["latent_norm"],
            noise_sigma=config["noise_sigma"],
        )
        model.encoder_spec, model.decoder_spec = config["encoder"], config["decoder"]
        load_weights(model, folder / WEIGHTS_NAME)
        return model.to(map_location).eval()
