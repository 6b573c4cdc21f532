"""Reconstruction metrics: PSNR/SSIM against an independent numpy computation, rFID with local weights only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from vgt_core.metrics import INCEPTION_WEIGHTS_NAME, ReconstructionMetrics, evaluate_reconstruction


def _numpy_mean_psnr(real: torch.Tensor, fake: torch.Tensor) -> float:
    a, b = (real.numpy().astype(np.float64) + 1) / 2, (fake.numpy().astype(np.float64) + 1) / 2
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(1.0 / mse)))


def _batch_with_errors(scales: list[float], size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals in [-0.8, 0.8] and reconstructions off by a different noise level per image (no clamping)."""
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(len(scales), 3, size, size, generator=g) * 1.6 - 0.8
    noise = torch.randn(real.shape, generator=g).clamp(-1, 1) * 0.2
    fake = real + noise * torch.tensor(scales).view(-1, 1, 1, 1)
    return real, fake


@pytest.fixture
def no_hub_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def test_psnr_is_mean_of_per_image_psnr(no_hub_weights):
    real, fake = _batch_with_errors([0.02, 0.3, 1.0, 0.1])
    metrics = ReconstructionMetrics()
    metrics.update(real[:3], fake[:3])  # two updates: accumulation across batches must not pool the MSE
    metrics.update(real[3:], fake[3:])
    out = metrics.compute()
    expected = _numpy_mean_psnr(real, fake)
    pooled = 10 * np.log10(1.0 / (((real - fake) / 2).double() ** 2).mean().item())
    assert abs(expected - pooled) > 3  # the errors differ enough to tell the two reductions apart
    assert out["psnr"] == pytest.approx(expected, abs=1e-3)
    assert out["n_images"] == 4


def test_ssim_is_one_for_identical_images_and_falls_with_noise(no_hub_weights):
    real, _ = _batch_with_errors([0.0, 0.0])
    scores = []
    for scale in (0.0, 0.1, 0.5, 1.0):
        metrics = ReconstructionMetrics()
        metrics.update(real, _batch_with_errors([scale, scale])[1])
        scores.append(metrics.compute()["ssim"])
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] < 0.99


def test_rfid_without_weights_is_skipped_with_a_note(no_hub_weights, tmp_path):
    metrics = ReconstructionMetrics()
    metrics.update(*_batch_with_errors([0.1, 0.1]))
    out = metrics.compute()
    assert out["rfid"] is None
    assert "--inception-weights" in out["rfid_note"]
    assert str(tmp_path / "hub" / "checkpoints" / INCEPTION_WEIGHTS_NAME) in out["rfid_note"]
    assert out["psnr"] > 0  # the other metrics still work
    with pytest.raises(FileNotFoundError):
        ReconstructionMetrics(inception_weights=tmp_path / "missing.pth")


@pytest.mark.slow
def test_rfid_with_local_weights(random_inception_weights, no_hub_weights):
    real, _ = _batch_with_errors([0.0] * 4, size=32)
    same = ReconstructionMetrics(inception_weights=random_inception_weights)
    same.update(real, real.clone())
    shifted = ReconstructionMetrics(inception_weights=random_inception_weights)
    shifted.update(real, (real * 0.5 + 0.4).flip(-1))
    rfid_same, rfid_shifted = same.compute()["rfid"], shifted.compute()["rfid"]
    assert rfid_shifted > 0 and abs(rfid_same) < 1e-3 * rfid_shifted, (rfid_same, rfid_shifted)

    one = ReconstructionMetrics(inception_weights=random_inception_weights)
    one.update(real[:1], real[:1])
    out = one.compute()
    assert out["rfid"] is None and "at least 2 images" in out["rfid_note"]


class NoisyAutoencoder(nn.Module):
    """Identity-ish autoencoder: a 2x2 average-pool latent, nearest upsampling back, then a fixed offset."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset
        self.calls: list[bool] = []

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(self.training or torch.is_grad_enabled())
        return nn.functional.avg_pool2d(images, 2)

    def decode(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return nn.functional.interpolate(z, size=size, mode="nearest") + self.offset


def test_evaluate_reconstruction_scores_every_batch_and_sums_skipped(no_hub_weights):
    # Images constant within each 2x2 block survive the round trip, so the only error is the offset.
    g = torch.Generator().manual_seed(1)
    batches = []
    for skipped in (2, 0, 3):
        coarse = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
        batches.append({"images": coarse.repeat_interleave(2, -1).repeat_interleave(2, -2), "skipped": skipped})
    batches.append({"images": torch.zeros(0, 3, 16, 16), "skipped": 1})  # a batch of only corrupt files
    ae = NoisyAutoencoder(offset=0.1).train()

    out = evaluate_reconstruction(ae, batches, "cpu", progress=False)
    assert out["skipped"] == 6 and out["n_images"] == 6
    assert out["psnr"] == pytest.approx(10 * np.log10(1 / 0.05**2), abs=1e-3)  # offset 0.1 is 0.05 on [0, 1]
    assert out["rfid"] is None and "--inception-weights" in out["rfid_note"]
    assert ae.calls == [False, False, False] and ae.training  # ran in eval mode without grad, then restored

    capped = evaluate_reconstruction(ae, batches, "cpu", max_images=3, progress=False)
    assert capped["n_images"] == 3
