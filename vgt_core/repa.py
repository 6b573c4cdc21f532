"""REPA's teacher: a frozen timm vision model whose patch features the flow head's projector is aligned to.

REPA (Yu et al., 2025) adds ``weight * -cos(feature, projector(head block feature))`` per latent token to the
flow-matching loss. Upstream's AR pretraining uses weight 0.5 with DINOv3 ViT-B/16
(``vit_base_patch16_dinov3.lvd1689m``): images go through timm's own preprocessing, the CLS and the 4 register
tokens are dropped, and the 16x16 patch grid is bilinearly resized to the latent grid. The generator side (the
head's projector and the loss) lives in ``vgt_core.flow`` / ``VGTGenerator.forward(..., repa_features=)``; this
module provides the teacher and the per-token targets.

Weights are read without unpickling anything: a local ``.safetensors`` file, a ``.pth``/``.pt``/``.bin`` file
through ``torch.load(weights_only=True)`` (plain tensors only; a file that needs code is refused), or timm's
Hugging Face hub entry forced to its ``model.safetensors``.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from vgt_core.errors import ConfigError

if TYPE_CHECKING:
    from vgt_core.config import ARTraining, GeneratorOptions

DEFAULT_MODEL = "vit_base_patch16_dinov3.lvd1689m"
HUB_WEIGHTS = "model.safetensors"  # the only file the hub path may read


def _unknown_model_message(name: str) -> str:
    import timm

    base = name.split(".")[0]
    known = sorted(set(timm.list_models(pretrained=True)) | set(timm.list_models()))
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    family = timm.list_models(f"*{base.split('_')[0]}*{base.split('_')[-1]}*", pretrained=True)[:5] if "_" in base else []
    listing = ", ".join(dict.fromkeys(close + family)) or "(none close; see timm.list_models())"
    return f"repa_model: unknown timm model {name!r}; close names: {listing}"


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` without running code from it (safetensors, or torch's weights-only loader)."""
    if not path.is_file():
        raise ConfigError(f"repa_weights: {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from vgt_adapters.upstream import TORCH_SUFFIXES, UpstreamCheckpointError, read_checkpoint

    if path.suffix not in TORCH_SUFFIXES:
        raise ConfigError(f"repa_weights: {path}: expected a .safetensors file (or one of {', '.join(TORCH_SUFFIXES)})")
    try:  # torch.load(weights_only=True): tensors and plain containers only, nothing is unpickled into code
        state, _ = read_checkpoint(path, prefer_ema=False)
    except UpstreamCheckpointError as exc:
        raise ConfigError(f"repa_weights: {exc}") from None
    return state


class RepaTeacher(nn.Module):
    """A frozen timm vision model mapping images in [-1, 1] to per-latent-token features ``(B, h*w, D)``.

    ``model`` is a timm name (architecture or ``architecture.tag``); ``model_kwargs`` go to
    ``timm.create_model`` (e.g. to shrink it in tests). ``weights``: a local file (``.safetensors``; a
    ``.pth``/``.bin`` is read with ``torch.load(weights_only=True)``), run through the model family's timm
    checkpoint filter, so Meta's original DINOv3 names load too; ``None`` reads timm's hub weights, and only
    from their ``model.safetensors``. ``image_size``: the side images are resized to before the model (default:
    the model's pretrained input size, 256 for DINOv3); it must be a multiple of the patch size.

    Preprocessing is the model's own (timm ``resolve_model_data_config``: interpolation, mean, std), applied to
    the whole image: a square image is resized to ``image_size`` squared (what timm's centre crop with
    ``crop_pct`` 1 does); a non-square one keeps its aspect on a patch-multiple size (shorter side
    ``image_size``) when the model takes dynamic sizes, so features stay aligned with the latent grid rather
    than cropped.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        weights: str | Path | None = None,
        image_size: int | None = None,
        **model_kwargs: Any,
    ):
        super().__init__()
        import timm
        from timm.data import resolve_model_data_config

        if not timm.is_model(model):
            raise ConfigError(_unknown_model_message(model))
        self.name = model
        kwargs = {"num_classes": 0, **model_kwargs}
        if weights is None:
            cfg = timm.models.get_pretrained_cfg(model)
            if cfg is None or not cfg.hf_hub_id:
                raise ConfigError(
                    f"repa_model {model!r} has no Hugging Face hub weights in timm (only hub safetensors are read); "
                    "give repa_weights: a local .safetensors file, or a tagged name such as "
                    f"{DEFAULT_MODEL!r}"
                )
            kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "hf_hub_filename": HUB_WEIGHTS}
        try:
            self.model = timm.create_model(model, pretrained=weights is None, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"repa_model_kwargs {model_kwargs}: not accepted by timm model {model!r}: {exc}") from None
        except RuntimeError as exc:  # timm: "No pretrained weights exist for ..."
            raise ConfigError(f"repa_model {model!r}: {exc}; give repa_weights: a local safetensors file") from None
        except OSError as exc:  # offline and not in the Hugging Face cache, or the hub has no model.safetensors
            raise ConfigError(
                f"REPA needs the weights of {model!r}: timm's hub file {HUB_WEIGHTS} could not be read ({exc}). "
                "Give repa_weights: a local .safetensors file (e.g. saved once on a machine with internet: "
                f"timm.create_model({model!r}, pretrained=True).state_dict() -> safetensors.torch.save_file)."
            ) from None
        if weights is not None:
            self._load(Path(weights))
        self.model.requires_grad_(False).eval()

        config = resolve_model_data_config(self.model)
        self.patch_size = self._patch_size()
        self.image_size = int(image_size or config["input_size"][-1])
        if self.image_size % self.patch_size:
            raise ConfigError(f"repa_image_size {self.image_size} is not a multiple of {model!r}'s patch size {self.patch_size}")
        self.interpolation = config.get("interpolation") if config.get("interpolation") in ("bilinear", "bicubic") else "bilinear"
        self.dynamic = bool(getattr(self.model, "dynamic_img_size", False))
        self.register_buffer("mean", torch.tensor(config["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    # -- construction ------------------------------------------------------------------------------------------

    def _patch_size(self) -> int:
        embed = getattr(self.model, "patch_embed", None)
        size = getattr(embed, "patch_size", None)
        if size is None:  # a CNN: one feature per stride of its last stage
            return int(self.model.feature_info[-1]["reduction"])
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def _load(self, path: Path) -> None:
        state = _read_weights(path)
        filter_fn = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:  # timm's own names pass through; original releases' names are mapped
            state = filter_fn(state, self.model)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} ({len(missing)})")
            if unexpected:
                parts.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)})")
            raise ConfigError(f"repa_weights: {path} does not fit timm model {self.name!r}: {'; '.join(parts)}")

    @property
    def feature_dim(self) -> int:
        """Width D of the features (the generator's ``repa_dim`` must equal it)."""
        return int(self.model.num_features)

    def train(self, mode: bool = True) -> RepaTeacher:
        """Always eval: the teacher is frozen (no dropout, no norm statistics updates)."""
        return super().train(False)

    # -- features ----------------------------------------------------------------------------------------------

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height`` x ``width`` is resized to before the model."""
        if height == width or not self.dynamic:
            return self.image_size, self.image_size
        scale = self.image_size / min(height, width)
        p = self.patch_size
        return max(p, round(height * scale / p) * p), max(p, round(width * scale / p) * p)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the model's normalised input (resized as ``input_size`` says)."""
        x = (images.float() + 1) / 2
        size = self.input_size(*x.shape[-2:])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """The model's patch features ``(B, D, gh, gw)``: prefix tokens (CLS, registers) dropped."""
        x = self.preprocess(images).to(next(self.model.parameters()).dtype)
        out = self.model.forward_features(x)
        if out.ndim == 4:  # a CNN's feature map is already (B, D, gh, gw)
            return out
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches = out[:, getattr(self.model, "num_prefix_tokens", 0) :]
        if patches.shape[1] != gh * gw:
            raise RuntimeError(f"{self.name}: {patches.shape[1]} patch tokens for a {gh}x{gw} grid (prefix tokens miscounted?)")
        return patches.transpose(1, 2).reshape(out.shape[0], -1, gh, gw)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Features ``(B, h*w, D)`` (float32) of images ``(B, 3, H, W)`` in [-1, 1], one per latent token of
        ``grid`` = (h, w) in raster order: the patch grid bilinearly resized to the latent grid."""
        features = self.patch_features(images).float()
        if tuple(features.shape[-2:]) != tuple(grid):
            features = F.interpolate(features, size=tuple(grid), mode="bilinear", align_corners=False)
        return features.flatten(2).transpose(1, 2).contiguous()


def repa_targets(teacher: RepaTeacher, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """REPA's per-token targets ``(B, h*w, D)`` for ``VGTGenerator.forward(..., repa_features=)``: the frozen
    teacher's features of ``images`` (in [-1, 1]) on the latent ``grid``, without gradients."""
    return teacher(images, grid)


def check_repa(generator_options: GeneratorOptions, teacher: RepaTeacher) -> None:
    """Raise unless the generator's REPA projector outputs the teacher's feature width."""
    if generator_options.repa_dim is None:
        raise ConfigError(
            f"train_ar.repa_weight > 0 needs a REPA projector in the flow head: set generator.repa_dim to "
            f"{teacher.feature_dim} (the feature width of {teacher.name!r})"
        )
    if generator_options.repa_dim != teacher.feature_dim:
        raise ConfigError(
            f"generator.repa_dim is {generator_options.repa_dim} but the REPA teacher {teacher.name!r} gives "
            f"{teacher.feature_dim}-dim features; set generator.repa_dim: {teacher.feature_dim}"
        )


def build_repa_teacher(training: ARTraining, generator_options: GeneratorOptions) -> RepaTeacher | None:
    """The teacher that ``training`` asks for (``None`` when ``repa_weight`` is 0), checked against the generator."""
    if training.repa_weight <= 0:
        return None
    teacher = RepaTeacher(training.repa_model, training.repa_weights, training.repa_image_size, **training.repa_model_kwargs)
    check_repa(generator_options, teacher)
    return teacher
