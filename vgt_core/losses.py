"""VGT-AE losses: the perceptual term (LPIPS from the ``lpips`` package + a ConvNeXt logit distance through
``timm``), the GAN discriminator with its hinge loss, and LeCam.

What the released code computes (``tokenizer/modeling/modules/losses.py``, ``perceptual_loss.py``,
``discriminator.py`` of hustvl/VGT), and what is offered here:

- Images are mapped from [-1, 1] to [0, 1] before every loss, so its MSE is 1/4 of an MSE on [-1, 1] and its
  discriminator sees [0, 1] images (``to_loss_range``). Its LPIPS maps them back to [-1, 1] (``x * 2 - 1``) and
  its ConvNeXt term ImageNet-normalises the [0, 1] images, so neither depends on that choice.
- perceptual = (1.0 * LPIPS + 0.1 * ConvNeXt-S) / (1.0 + 0.1), then weighted by 1.1: ``PerceptualLoss``.
- The discriminator: ``Discriminator(layout="upstream")``; vgt's earlier one is ``layout="patch"``.
- LeCam on the batch means of the logits, against EMAs updated after the loss: ``LeCam``.

The discriminator is written here because no maintained library ships an image GAN discriminator for
autoencoder training (taming-transformers is unmaintained; diffusers has none).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn

from vgt_core.errors import ConfigError
from vgt_core.serialization import load_state_dict_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LossRange = Literal["unit", "signed"]


def to_loss_range(images: torch.Tensor, loss_range: LossRange) -> torch.Tensor:
    """Images in [-1, 1] -> the range the MSE and the discriminator see: ``unit`` [0, 1] (upstream), ``signed``
    [-1, 1] (unchanged)."""
    if loss_range == "unit":
        return (images + 1) / 2
    if loss_range == "signed":
        return images
    raise ValueError(f"loss_range must be 'unit' or 'signed', got {loss_range!r}")


class _Frozen(nn.Module):
    """A loss network: no gradients into its parameters, always in eval mode (dropout off)."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _Frozen:
        return self


# lpips builds its trunks with torchvision's legacy ``pretrained=True``: these weights, in torch's hub cache.
TORCHVISION_TRUNKS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def torchvision_trunk_file(net: str) -> Path:
    """Where torchvision keeps the ImageNet weights of lpips' ``net`` trunk (e.g. ``vgg16-397923af.pth``)."""
    import torchvision.models as tvm

    if net not in TORCHVISION_TRUNKS:
        raise ConfigError(f"perceptual_net {net!r}: expected one of {', '.join(TORCHVISION_TRUNKS)}")
    url = getattr(tvm, TORCHVISION_TRUNKS[net]).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


class LPIPSLoss(_Frozen):
    """LPIPS distance (mean over the batch) between images in [-1, 1].

    ``lpips.LPIPS(pretrained=True)`` lets torchvision unpickle the trunk's hub file with ``weights_only=False``.
    So the network is built with no weights at all and filled here, every file read as tensors only
    (``load_state_dict_file``): lpips' own linear layers from the package, and with ``backbone: pretrained``
    torchvision's ImageNet trunk from the torch hub cache (``vgg16-397923af.pth``, or the same name with
    ``.safetensors``; downloaded there from torchvision's URL when missing, as torchvision would). The result is
    the network ``lpips.LPIPS(net=net)`` builds.
    """

    def __init__(self, net: str = "vgg", backbone: str = "pretrained"):
        super().__init__()
        import lpips

        trunk = self._trunk_weights(net) if backbone == "pretrained" else None  # first: a bad file fails fast
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation of `pretrained=`
            self.lpips = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
        lins = Path(lpips.__file__).parent / "weights" / f"v{self.lpips.version}" / f"{net}.pth"
        _, unexpected = self.lpips.load_state_dict(load_state_dict_file(lins, f"lpips' {net} linear layers"), strict=False)
        if unexpected:
            raise ConfigError(f"{lins}: unexpected LPIPS parameters {sorted(unexpected)[:5]}")
        if trunk is not None:
            # lpips keeps torchvision's layer indices: its ``slice<k>.<i>.*`` is torchvision's ``features.<i>.*``.
            names = self.lpips.net.state_dict()
            try:
                self.lpips.net.load_state_dict({name: trunk[re.sub(r"^slice\d+\.", "features.", name)] for name in names})
            except (KeyError, RuntimeError) as exc:
                raise ConfigError(f"{torchvision_trunk_file(net)}: not torchvision's {net} features: {exc}") from None
        self.freeze()

    @staticmethod
    def _trunk_weights(net: str) -> dict[str, torch.Tensor]:
        """torchvision's ImageNet weights of the trunk from the torch hub cache, read as tensors only."""
        path = torchvision_trunk_file(net)
        found = next((p for p in (path, path.with_suffix(".safetensors")) if p.is_file()), None)
        if found is None:  # fetched as torchvision would (same URL, same hash check), but not unpickled
            import torchvision.models as tvm

            url = getattr(tvm, TORCHVISION_TRUNKS[net]).IMAGENET1K_V1.url
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), hash_prefix=torch.hub.HASH_REGEX.search(path.name).group(1), progress=False)
            except (URLError, OSError, RuntimeError) as exc:  # offline, or a bad download (hash mismatch)
                raise ConfigError(
                    f"LPIPS needs torchvision's ImageNet {net} weights, which are not in {path.parent} and cannot be "
                    f"downloaded here ({exc}). Put {path.name} there (as torchvision publishes it: tensors only, read "
                    f"with weights_only=True) or the same tensors as {path.with_suffix('.safetensors').name}, or set "
                    "perceptual_backbone: random (offline tests) or perceptual_weight: 0."
                ) from None
            found = path
        return load_state_dict_file(found, f"LPIPS {net} trunk")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x.float(), y.float()).mean()


def convnext_from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ``convnext_*`` parameter names -> timm's (the two compute the same function). Upstream's
    perceptual term uses torchvision's ``ConvNeXt_Small_Weights.IMAGENET1K_V1``; saved as safetensors, this makes
    them loadable into timm's ``convnext_small``."""
    out = {}
    block_parts = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}
    for name, value in state.items():
        parts = name.split(".")
        if parts[0] == "classifier":  # LayerNorm2d, Flatten, Linear
            new = {"0": "head.norm", "2": "head.fc"}[parts[1]] + "." + parts[2]
        elif parts[0] == "features" and parts[1] == "0":  # stem: conv 4x4/4, LayerNorm2d
            new = f"stem.{parts[2]}.{parts[3]}"
        elif parts[0] == "features" and int(parts[1]) % 2 == 0:  # downsample before stage k: LayerNorm2d, conv
            new = f"stages.{int(parts[1]) // 2}.downsample.{parts[2]}.{parts[3]}"
        elif parts[0] == "features":  # stage k's blocks
            stage, block = (int(parts[1]) - 1) // 2, parts[2]
            if parts[3] == "layer_scale":
                new, value = f"stages.{stage}.blocks.{block}.gamma", value.reshape(-1)
            else:
                new = f"stages.{stage}.blocks.{block}.{block_parts[parts[4]]}.{parts[5]}"
        else:
            raise ValueError(f"not a torchvision ConvNeXt parameter: {name!r}")
        out[new] = value
    return out


class ConvNeXtLoss(_Frozen):
    """MSE between a frozen ConvNeXt's ImageNet-class logits of two images in [-1, 1]: mapped to [0, 1], resized
    to ``size`` x ``size`` (bilinear, antialiased), ImageNet-normalised -- upstream's ConvNeXt-S term.

    ``model`` is a timm model name (upstream: convnext_small). Weights: ``weights`` (a safetensors file with timm
    or torchvision parameter names), else timm's pretrained weights for ``model`` when ``backbone`` is
    ``pretrained`` (timm reads safetensors from the Hugging Face hub, or its cache offline), else random
    (``backbone: random``, offline tests). ``model_kwargs`` go to ``timm.create_model`` (e.g. tiny ``depths``).
    """

    def __init__(
        self,
        model: str = "convnext_small.fb_in1k",
        backbone: str = "pretrained",
        weights: str | Path | None = None,
        size: int = 224,
        **model_kwargs: Any,
    ):
        super().__init__()
        import timm

        pretrained = backbone == "pretrained" and weights is None
        try:
            self.net = timm.create_model(model, pretrained=pretrained, **model_kwargs)
        except RuntimeError as exc:  # unknown model names raise RuntimeError too; keep that message
            raise ConfigError(f"convnext_model {model!r}: {exc}") from None
        except (URLError, OSError) as exc:
            raise ConfigError(
                f"the ConvNeXt perceptual term needs timm's pretrained weights of {model!r}, which are not in the "
                f"Hugging Face cache and cannot be downloaded here ({exc}). Give convnext_weights: a safetensors "
                "file, or set perceptual_backbone: random (offline tests) or convnext_weight: 0."
            ) from None
        if weights is not None:
            self._load(Path(weights))
        self.size = size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file
        from timm.models.convnext import checkpoint_filter_fn

        if path.suffix != ".safetensors" or not path.is_file():
            raise ConfigError(f"convnext_weights: {path} is not a .safetensors file (nothing here unpickles .pth files)")
        state = load_file(str(path))
        if any(re.match(r"features\.\d", k) for k in state):
            state = convnext_from_torchvision(state)
        else:
            state = checkpoint_filter_fn(state, self.net)  # timm's own names, or Meta's original ones
        try:
            self.net.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"convnext_weights: {path} does not fit the ConvNeXt model: {exc}") from None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.logits(y)
        return F.mse_loss(self.logits(x), target)


class PerceptualLoss(nn.Module):
    """Upstream's ``PerceptualLoss("lpips-convnext_s-1.0-<w>")``: (1.0 * LPIPS + w * ConvNeXt) / (1.0 + w).

    With the stage's ``perceptual_weight`` of 1.1 and w = 0.1 the total is LPIPS + 0.1 * ConvNeXt, as released;
    w = 0 leaves LPIPS alone. ``forward`` returns ``{"lpips", "convnext" (if w > 0), "perceptual"}``.
    """

    def __init__(
        self,
        net: str = "vgg",
        backbone: str = "pretrained",
        *,
        convnext_weight: float = 0.0,
        convnext_model: str = "convnext_small.fb_in1k",
        convnext_weights: str | Path | None = None,
        convnext_size: int = 224,
        **convnext_kwargs: Any,
    ):
        super().__init__()
        if convnext_weight < 0:
            raise ValueError(f"convnext_weight must be >= 0, got {convnext_weight}")
        self.lpips = LPIPSLoss(net, backbone)
        self.convnext_weight = convnext_weight
        self.convnext = (
            ConvNeXtLoss(convnext_model, backbone, convnext_weights, convnext_size, **convnext_kwargs) if convnext_weight > 0 else None
        )

    @classmethod
    def for_stage(cls, stage: Any) -> PerceptualLoss | None:
        """The loss a VGT-AE stage recipe (``train_ae.stage1``/``stage2``) asks for; None when its weight is 0."""
        if stage.perceptual_weight <= 0:
            return None
        return cls(
            stage.perceptual_net,
            stage.perceptual_backbone,
            convnext_weight=stage.convnext_weight,
            convnext_model=stage.convnext_model,
            convnext_weights=stage.convnext_weights,
            convnext_size=stage.convnext_size,
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        # Full precision, as upstream's loss module (autocast off): LPIPS distances are small differences.
        with torch.autocast(x.device.type, enabled=False):
            terms = {"lpips": self.lpips(x, y)}
            if self.convnext is None:
                terms["perceptual"] = terms["lpips"]
            else:
                terms["convnext"] = self.convnext(x, y)
                terms["perceptual"] = (terms["lpips"] + self.convnext_weight * terms["convnext"]) / (1 + self.convnext_weight)
        return terms


# -- discriminator ---------------------------------------------------------------------------------------------


class _Blur(nn.Module):
    """Anti-aliased 2x downsampling with the fixed [1, 3, 3, 1] binomial filter.

    ``padding="same"``: zeros, as TensorFlow's SAME for a 4-tap stride-2 filter (1 + 1 on even sides; upstream's
    ``BlurBlock``). ``padding="reflect"``: (1, 2) reflected (vgt's ``patch`` layout)."""

    def __init__(self, channels: int, padding: Literal["same", "reflect"]):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = (k[:, None] * k[None, :]) / 64
        self.register_buffer("kernel", k.expand(channels, 1, 4, 4).clone(), persistent=False)
        self.channels, self.padding = channels, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "reflect":
            x = F.pad(x, (1, 2, 1, 2), mode="reflect")
        else:
            pads = [max((-(-n // 2) - 1) * 2 + 4 - n, 0) for n in x.shape[-2:]]  # (ceil(n/2) - 1) * s + k - n
            x = F.pad(x, (pads[1] // 2, pads[1] - pads[1] // 2, pads[0] // 2, pads[0] - pads[0] // 2))
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, groups=self.channels)


DiscLayout = Literal["upstream", "patch"]


def discriminator_widths(channels: int, stages: int, layout: DiscLayout) -> list[int]:
    """Widths of the input conv and of each stage's output.

    upstream: ``channels * (1, 1, 2, 4, ...)`` -- 128 -> 128 -> 256 -> 512 (MaskGIT's ``NLayerDiscriminator``).
    patch: ``channels * min(2**i, 4)`` -- 128 -> 256 -> 512 -> 512."""
    if layout == "upstream":
        return [channels] + [channels * 2**i for i in range(stages)]
    if layout == "patch":
        return [channels * min(2**i, 4) for i in range(stages + 1)]
    raise ValueError(f"disc_layout must be 'upstream' or 'patch', got {layout!r}")


class Discriminator(nn.Module):
    """Images -> a map of real/fake logits.

    Both layouts: conv 5x5 (3 -> channels) + LeakyReLU(0.1); ``stages`` x [conv 3x3, blur 2x down, GroupNorm(32),
    LeakyReLU(0.1)]; conv 1x1 + LeakyReLU(0.1); conv 5x5 -> 1 channel. Convs are zero-padded "same".

    ``upstream`` (the released code): widths 128, 128, 256, 512; zero "same" blur padding; an adaptive max-pool to
    ``pool`` x ``pool`` (16) before the 1x1 conv, so the logit map is 16 x 16 whatever the image size (smaller
    maps are repeated up to it). ``patch`` (vgt's earlier layout): widths 128, 256, 512, 512; reflect padding; no
    pooling (one logit per 8x8 patch). GroupNorm uses min(32, width) groups, so narrow test widths work.
    """

    def __init__(self, channels: int = 128, stages: int = 3, *, layout: DiscLayout = "upstream", groups: int = 32, pool: int = 16):
        super().__init__()
        widths = discriminator_widths(channels, stages, layout)
        padding = "same" if layout == "upstream" else "reflect"
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 5, padding=2), nn.LeakyReLU(0.1)]
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), _Blur(cout, padding), nn.GroupNorm(min(groups, cout), cout), nn.LeakyReLU(0.1)]
        if layout == "upstream":
            layers.append(nn.AdaptiveMaxPool2d((pool, pool)))
        layers += [nn.Conv2d(widths[-1], widths[-1], 1), nn.LeakyReLU(0.1), nn.Conv2d(widths[-1], 1, 5, padding=2)]
        self.net = nn.Sequential(*layers)
        self.widths, self.layout = widths, layout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


class LeCam(nn.Module):
    """LeCam regulariser (Tseng et al., 2021) as the released code computes it: the batch means of the real and
    fake logits are pulled towards EMAs of the other class's means,
    relu(mean(real) - ema_fake)^2 + relu(ema_real - mean(fake))^2; the EMAs are updated after the loss."""

    def __init__(self, decay: float = 0.999):
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(
        self, real_logits: torch.Tensor, fake_logits: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``reduce`` averages the means over processes before they update the EMAs, so every process keeps the
        same EMAs (a distributed run's checkpoint holds one copy)."""
        real, fake = real_logits.float().mean(), fake_logits.float().mean()
        loss = F.relu(real - self.ema_fake).pow(2) + F.relu(self.ema_real - fake).pow(2)
        with torch.no_grad():
            r, f = real.detach(), fake.detach()
            if reduce is not None:
                r, f = reduce(r), reduce(f)
            self.ema_real.lerp_(r, 1 - self.decay)
            self.ema_fake.lerp_(f, 1 - self.decay)
        return loss
