"""VGT-AE losses: LPIPS (the ``lpips`` package), a patch discriminator with hinge loss, LeCam.

The discriminator is written here because no maintained library ships an image GAN discriminator for
autoencoder training (taming-transformers is unmaintained; diffusers has none). Its layout follows the
MaskGIT-style one upstream uses: strided convs with blur downsampling, GroupNorm and LeakyReLU.
"""

from __future__ import annotations

import warnings
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn

from vgt_core.errors import ConfigError


class PerceptualLoss(nn.Module):
    """LPIPS distance (mean over the batch) between images in [-1, 1]; frozen."""

    def __init__(self, net: str = "vgg", backbone: str = "pretrained"):
        super().__init__()
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation of `pretrained=`
            try:
                self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=backbone == "random", verbose=False)
            except (URLError, OSError) as exc:
                raise ConfigError(
                    f"LPIPS needs torchvision's ImageNet {net} weights, which are not in the local torch hub cache "
                    f"({torch.hub.get_dir()}/checkpoints) and cannot be downloaded here ({exc}). Copy them there, "
                    "or set perceptual_backbone: random (offline tests) or perceptual_weight: 0."
                ) from None
        self.lpips.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return self  # always in eval mode (dropout off)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x.float(), y.float()).mean()


class _BlurDown(nn.Module):
    """Anti-aliased 2x downsampling with a fixed [1, 3, 3, 1] binomial filter."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = (k[:, None] * k[None, :]) / 64
        self.register_buffer("kernel", k.expand(channels, 1, 4, 4).clone(), persistent=False)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 2, 1, 2), mode="reflect"), self.kernel.to(x.dtype), stride=2, groups=self.channels)


class PatchDiscriminator(nn.Module):
    """Images in [-1, 1] -> a map of real/fake logits (one per patch)."""

    def __init__(self, channels: int = 128, stages: int = 3, groups: int = 32):
        super().__init__()
        widths = [channels * min(2**i, 4) for i in range(stages + 1)]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 5, padding=2), nn.LeakyReLU(0.1)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1),
                _BlurDown(cout),
                nn.GroupNorm(min(groups, cout), cout),
                nn.LeakyReLU(0.1),
            ]
        layers += [nn.Conv2d(widths[-1], widths[-1], 1), nn.LeakyReLU(0.1), nn.Conv2d(widths[-1], 1, 5, padding=2)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al., 2021): keeps discriminator outputs near EMAs of the other class's."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.ema_real.lerp_(real_logits.mean().float(), 1 - self.decay)
            self.ema_fake.lerp_(fake_logits.mean().float(), 1 - self.decay)
        return F.relu(real_logits - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake_logits).pow(2).mean()
