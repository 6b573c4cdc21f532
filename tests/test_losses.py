"""The VGT-AE loss pieces compute what the released code computes, learn, and leave their frozen nets alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vgt_core.errors import ConfigError
from vgt_core.losses import (
    ConvNeXtLoss,
    Discriminator,
    LeCam,
    PerceptualLoss,
    convnext_from_torchvision,
    hinge_d_loss,
    to_loss_range,
)

TINY_CONVNEXT = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "num_classes": 10}


def tiny_convnext(**kwargs) -> ConvNeXtLoss:
    torch.manual_seed(0)
    return ConvNeXtLoss("convnext_small", backbone="random", size=32, **{**TINY_CONVNEXT, **kwargs})


def test_unit_range_mse_is_a_quarter_of_the_signed_one(images):
    recon = images.flip(-1) * 0.7
    signed = F.mse_loss(to_loss_range(recon, "signed"), to_loss_range(images, "signed"))
    unit = F.mse_loss(to_loss_range(recon, "unit"), to_loss_range(images, "unit"))
    assert torch.allclose(unit, signed / 4, rtol=1e-6)
    assert to_loss_range(images, "unit").min() >= 0 and to_loss_range(images, "unit").max() <= 1
    with pytest.raises(ValueError, match="loss_range"):
        to_loss_range(images, "zero-one")


def test_convnext_term_learns_an_image_towards_its_target():
    loss_fn = tiny_convnext()
    torch.manual_seed(1)
    target = torch.rand(2, 3, 48, 48) * 2 - 1
    image = nn.Parameter(torch.zeros(2, 3, 48, 48))
    optimizer = torch.optim.Adam([image], lr=0.05)
    losses = []
    for _ in range(60):
        loss = loss_fn(image, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0 and losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_convnext_gradients_reach_the_decoder_and_never_the_frozen_net():
    loss_fn = tiny_convnext()
    frozen = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    decoder = nn.Sequential(nn.Conv2d(4, 3, 3, padding=1), nn.Tanh())
    optimizer = torch.optim.SGD([*decoder.parameters(), *loss_fn.parameters()], lr=1.0)  # a bug would move it
    latent, target = torch.randn(2, 4, 40, 40), torch.rand(2, 3, 40, 40) * 2 - 1
    loss_fn.train()  # stays in eval mode whatever the caller does
    assert not loss_fn.training and not loss_fn.net.training
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn(decoder(latent), target).backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder.parameters())
        assert all(p.grad is None and not p.requires_grad for p in loss_fn.parameters())
        optimizer.step()
    assert all(torch.equal(frozen[k], v) for k, v in loss_fn.state_dict().items())


def test_convnext_term_follows_upstream_preprocessing():
    """MSE of logits of [0, 1] images resized to `size` (bilinear, antialiased) and ImageNet-normalised."""
    loss_fn = tiny_convnext()
    x, y = torch.rand(2, 3, 50, 70) * 2 - 1, torch.rand(2, 3, 50, 70) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def logits(z):
        z = F.interpolate((z + 1) / 2, size=32, mode="bilinear", align_corners=False, antialias=True)
        return loss_fn.net((z - mean) / std)

    assert torch.allclose(loss_fn(x, y), F.mse_loss(logits(x), logits(y)), rtol=1e-5)


def test_torchvision_convnext_weights_load_into_timm_and_compute_the_same_logits(tmp_path):
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    widths = TINY_CONVNEXT["dims"]
    setting = [CNBlockConfig(w, n, 1) for w, n in zip(widths, [*widths[1:], None])]
    reference = ConvNeXt(setting, num_classes=10).eval()
    for p in reference.parameters():  # layer scales start at 1e-6: make every weight matter
        p.data.normal_(0, 0.2)
    save_file(reference.state_dict(), str(tmp_path / "tv.safetensors"))
    loss_fn = ConvNeXtLoss("convnext_small", backbone="random", weights=tmp_path / "tv.safetensors", size=32, **TINY_CONVNEXT)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loss_fn.net(x), reference(x), atol=1e-4)
    assert set(convnext_from_torchvision(reference.state_dict())) == set(loss_fn.net.state_dict())

    save_file({"stem.0.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="bad.safetensors"):
        ConvNeXtLoss("convnext_small", backbone="random", weights=tmp_path / "bad.safetensors", **TINY_CONVNEXT)
    with pytest.raises(ConfigError, match="safetensors"):
        ConvNeXtLoss("convnext_small", backbone="random", weights=tmp_path / "weights.pth", **TINY_CONVNEXT)


def test_perceptual_term_is_lpips_plus_a_tenth_of_convnext_at_weight_1_1(images):
    torch.manual_seed(0)
    loss_fn = PerceptualLoss("squeeze", "random", convnext_weight=0.1, convnext_model="convnext_small", convnext_size=32, **TINY_CONVNEXT)
    terms = loss_fn(images.flip(-1), images)
    assert set(terms) == {"lpips", "convnext", "perceptual"}
    assert torch.allclose(1.1 * terms["perceptual"], terms["lpips"] + 0.1 * terms["convnext"], rtol=1e-5)
    lpips_only = PerceptualLoss("squeeze", "random")
    assert set(lpips_only(images.flip(-1), images)) == {"lpips", "perceptual"}


def test_upstream_discriminator_has_the_released_widths_order_and_16x16_pool():
    disc = Discriminator(128, layout="upstream")
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [
        (3, 128, 5), (128, 128, 3), (128, 256, 3), (256, 512, 3), (512, 512, 1), (512, 1, 5)
    ]
    kinds = [type(m).__name__ for m in disc.net]
    assert kinds == [
        "Conv2d", "LeakyReLU",
        *["Conv2d", "_Blur", "GroupNorm", "LeakyReLU"] * 3,
        "AdaptiveMaxPool2d", "Conv2d", "LeakyReLU", "Conv2d",
    ]
    assert all(m.negative_slope == 0.1 for m in disc.net if isinstance(m, nn.LeakyReLU))
    assert all(m.num_groups == 32 for m in disc.net if isinstance(m, nn.GroupNorm))
    assert Discriminator(128, layout="patch").widths == [128, 256, 512, 512]  # vgt's earlier layout, kept by name

    small = {layout: Discriminator(8, layout=layout) for layout in ("upstream", "patch")}
    for side in (64, 256):
        x = torch.randn(1, 3, side, side)
        assert small["upstream"](x).shape == (1, 1, 16, 16)  # pooled to 16 x 16 at any size
        assert small["patch"](x).shape == (1, 1, side // 8, side // 8)


def test_discriminator_learns_to_separate_real_from_fake():
    torch.manual_seed(0)
    disc = Discriminator(8, layout="upstream")
    optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    real = torch.full((4, 3, 32, 32), 0.8) + 0.05 * torch.randn(4, 3, 32, 32)
    fake = torch.rand(4, 3, 32, 32)
    losses = []
    for _ in range(40):
        loss = hinge_d_loss(disc(real), disc(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_lecam_uses_batch_means_and_updates_its_emas_after_the_loss():
    lecam = LeCam(decay=0.9)
    real, fake = torch.tensor([[3.0, -1.0]]), torch.tensor([[-2.0, 0.0]])  # means 1 and -1
    assert torch.allclose(lecam(real, fake), torch.tensor(1.0 + 1.0))  # EMAs still 0: relu(1 - 0)^2 + relu(0 + 1)^2
    assert torch.allclose(lecam.ema_real, torch.tensor(0.1)) and torch.allclose(lecam.ema_fake, torch.tensor(-0.1))
    expected = (1 - -0.1) ** 2 + (0.1 - -1) ** 2
    assert torch.allclose(lecam(real, fake), torch.tensor(expected))
