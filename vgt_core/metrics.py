"""Reconstruction metrics for the image autoencoder: PSNR, SSIM and rFID over a stream of batches.

Nothing here downloads anything: rFID runs only when the Inception weights are already on disk. Nothing here
unpickles anything either: the weights are read as tensors only (``load_state_dict_file``) before
torch-fidelity's InceptionV3 sees them.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm.auto import tqdm

from vgt_core.errors import ConfigError
from vgt_core.serialization import load_state_dict_file

INCEPTION_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity's own download of the same converted TF Inception (same keys, same hash prefix).
_FIDELITY_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def find_inception_weights(path: str | os.PathLike | None = None) -> tuple[Path | None, list[Path]]:
    """The weights file to use and the places looked at; an explicit path that does not exist is an error."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        return path, [path]
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    names = [INCEPTION_WEIGHTS_NAME, _FIDELITY_WEIGHTS_NAME]
    candidates = [hub / n for n in names] + [hub / Path(n).with_suffix(".safetensors") for n in names]
    return next((c for c in candidates if c.is_file()), None), candidates


def inception_v3(weights: str | os.PathLike) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (pool3 features) with the weights of ``weights``.

    The library unpickles a weights *path* with ``weights_only=False``, which would run any code a planted file
    holds. So the file is read here as tensors only (a ``.safetensors`` file, or a torch file under
    ``weights_only=True``) and the library gets those tensors, re-serialised in memory: the only bytes it
    unpickles are ones vgt just wrote from plain tensors. Its forward is unchanged, so rFID is too.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = load_state_dict_file(weights, "Inception weights")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    except RuntimeError as exc:  # strict load_state_dict: missing / unexpected keys or shapes
        raise ConfigError(f"Inception weights: {weights} do not fit torch-fidelity's InceptionV3: {exc}") from None


class _InceptionPool3(nn.Module):
    """torch-fidelity's InceptionV3 returns a tuple of features; torchmetrics' FID wants one (B, 2048) tensor."""

    num_features = 2048  # also spares torchmetrics a dummy 299x299 forward to infer it

    def __init__(self, weights: Path) -> None:
        super().__init__()
        self.net = inception_v3(weights)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        # The extractor itself resizes to 299 (TF1-style bilinear) and rescales 0..255 to [-1, 1].
        return self.net(images_uint8)[0]


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


class ReconstructionMetrics:
    """PSNR, SSIM and rFID between originals and reconstructions, both in [-1, 1], accumulated batch by batch.

    Images are clamped and mapped to [0, 1] and both PSNR and SSIM use ``data_range=1.0``. The released upstream
    evaluation computes SSIM with ``data_range=2`` on [0, 1] images, which inflates SSIM; we deliberately do not.

    PSNR is the mean of per-image PSNRs (torchmetrics with ``dim=(1, 2, 3)``, ``reduction="elementwise_mean"``),
    as skimage-style evaluations report it, not the PSNR of the MSE pooled over the whole set. An exactly
    reconstructed image has infinite PSNR, and so then does the mean; we do not cap it.

    SSIM is torchmetrics' default (11x11 Gaussian window, sigma 1.5), averaged over images.
    """

    def __init__(self, inception_weights: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean").to(self.device)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(self.device)
        self.n_images = 0
        self.fid, self.rfid_note = None, None
        weights, looked = find_inception_weights(inception_weights)
        if weights is None:
            self.rfid_note = (
                f"Inception weights {INCEPTION_WEIGHTS_NAME} not found locally (looked in "
                f"{', '.join(map(str, looked))}); pass --inception-weights PATH to compute rFID"
            )
            return
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            self.fid = FrechetInceptionDistance(feature=_InceptionPool3(weights), normalize=False).to(self.device)
        except ImportError:
            self.rfid_note = "torch-fidelity is not installed (pip install 'vgt[fid]'); rFID skipped"

    @torch.no_grad()
    def update(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        if real.shape != fake.shape:
            raise ValueError(f"originals {tuple(real.shape)} and reconstructions {tuple(fake.shape)} differ in shape")
        real, fake = real.to(self.device, torch.float32), fake.to(self.device, torch.float32)
        real01, fake01 = ((real + 1) / 2).clamp(0, 1), ((fake + 1) / 2).clamp(0, 1)
        self.psnr.update(fake01, real01)
        self.ssim.update(fake01, real01)
        if self.fid is not None:
            self.fid.update(_to_uint8(real), real=True)
            self.fid.update(_to_uint8(fake), real=False)
        self.n_images += real.shape[0]

    def compute(self) -> dict[str, Any]:
        """``psnr`` (dB), ``ssim``, ``rfid`` (None when skipped, with ``rfid_note`` saying why) and ``n_images``."""
        empty = self.n_images == 0
        out: dict[str, Any] = {
            "psnr": math.nan if empty else float(self.psnr.compute()),
            "ssim": math.nan if empty else float(self.ssim.compute()),
            "rfid": None,
            "n_images": self.n_images,
        }
        if self.fid is not None and self.n_images < 2:
            out["rfid_note"] = f"rFID needs at least 2 images, got {self.n_images}"
        elif self.fid is not None:
            out["rfid"] = float(self.fid.compute())
        else:
            out["rfid_note"] = self.rfid_note
        return out


@dataclass(frozen=True)
class ReconProtocol:
    """How images reach the autoencoder and the metrics. Images are read aspect-preserving at the encoder's own size:
    the shorter side resized (bicubic, antialiased), then a centre square crop (``vgt_core.data.transform_image``).

    ``imagenet256`` is the paper's Table 2 set-up (ImageNet-1k val, 50k images): the encoder's 448 px in,
    original and reconstruction both downsampled to 256 (bilinear, antialiased) and scored there. Upstream
    squashes every image to 448x448 instead, which distorts non-square images (most of ImageNet)."""

    name: str
    score_size: int | None = None  # None: score at the input size
    paper_input_size: int | None = None  # the input size the published numbers used
    resize: str = "shorter side to the encoder's size (bicubic, antialias), centre crop"
    downsample: str = "bilinear, antialias"

    def settings(self, encoder_size: int) -> dict[str, Any]:
        return {**asdict(self), "input_size": encoder_size, "score_size": self.score_size or encoder_size}


PROTOCOLS = {
    "native": ReconProtocol("native"),
    "imagenet256": ReconProtocol("imagenet256", score_size=256, paper_input_size=448),
}


def resize_for_scoring(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``(B, 3, H, W)`` square images to ``size`` x ``size`` (bilinear, antialiased); unchanged when ``size`` is
    None or already theirs. Originals and reconstructions go through the same resize, so it is not scored."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(-1, 1)


def _all_ranks_sum(value: int, device: torch.device | str) -> int:
    """``value`` summed over the processes of ``accelerate launch`` / ``torchrun`` (itself in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    total = torch.tensor([value], device=device)
    dist.all_reduce(total)
    return int(total.item())


def evaluate_reconstruction(
    autoencoder: Any,
    loader: Any,
    device: torch.device | str,
    inception_weights: str | os.PathLike | None = None,
    max_images: int | None = None,
    progress: bool = True,
    score_size: int | None = None,
) -> dict[str, Any]:
    """Encode and decode every batch of ``loader`` (dicts with ``images`` in [-1, 1] and ``skipped``) and score it,
    at ``score_size`` px when given (both images resized by ``resize_for_scoring``).

    Several processes (``accelerate launch``) each pass their own part of the data: torchmetrics gathers the
    metric states across them, and ``n_images`` and ``skipped`` are summed. ``max_images`` is per process.

    Returns ``psnr``, ``ssim``, ``rfid`` (+ ``rfid_note`` when skipped), ``n_images`` and ``skipped``, the number
    of unreadable files the collate dropped.
    """
    metrics = ReconstructionMetrics(inception_weights, device=device)
    was_training = getattr(autoencoder, "training", False)
    if isinstance(autoencoder, nn.Module):
        autoencoder.eval()
    skipped = 0
    try:
        with torch.no_grad(), tqdm(total=max_images, desc="reconstruction", unit="img", disable=not progress) as bar:
            for batch in loader:
                skipped += int(batch.get("skipped", 0))
                images = batch["images"]
                if max_images is not None:
                    images = images[: max_images - metrics.n_images]
                if images.shape[0] == 0:
                    continue
                images = images.to(device)
                recon = autoencoder.decode(autoencoder.encode(images), tuple(images.shape[-2:]))
                metrics.update(resize_for_scoring(images, score_size), resize_for_scoring(recon, score_size))
                bar.update(images.shape[0])
                if max_images is not None and metrics.n_images >= max_images:
                    break
    finally:
        if isinstance(autoencoder, nn.Module):
            autoencoder.train(was_training)
    metrics.n_images = _all_ranks_sum(metrics.n_images, device)
    return {**metrics.compute(), "skipped": _all_ranks_sum(skipped, device)}
