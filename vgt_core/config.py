"""Configuration models (pydantic, unknown keys forbidden) and the loader of ``registry.yaml``.

Validation has two stages, as in llm and timm: the models here check the structure of a preset (which
component, which training recipe); each registered component then validates its own ``options`` with the
model it registered. Every error names the file, the key path, the bad value and the allowed values.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vgt_core.errors import ConfigError, unknown_name_message

BUILTIN_REGISTRY = Path(__file__).with_name("registry.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ComponentSpec(Strict):
    """A registered component by name, with the options its own model validates."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


LatentNorm = Literal["none", "layernorm", "batchnorm"]
Precision = Literal["auto", "no", "bf16", "fp16"]


class AEStage(Strict):
    """One stage of VGT-AE training (paper §3.2; defaults are the released stage-1 recipe)."""

    steps: int = Field(100_000, gt=0)
    batch_size: int = Field(
        128, gt=0, description="global batch of one optimizer step, split across processes and micro-batches (upstream: 16/GPU x 8)"
    )
    lr: float = Field(3e-4, gt=0, description="generator and discriminator learning rate")
    end_lr: float = Field(1e-4, ge=0, description="floor of the cosine schedule")
    warmup_steps: int = Field(3000, ge=0)
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, description="gradient-norm clipping of the autoencoder and of the discriminator")
    encoder_lr_mult: float = Field(0.5, ge=0, description="0 freezes the encoder (the paper's stage 2); 0.5 is upstream's")
    latent_norm: LatentNorm = Field("none", description="layernorm: per position over channels (upstream code); batchnorm: per channel over the batch (paper text)")
    noise_sigma: float = Field(0.0, ge=0, description="training noise z + a*eps with a ~ U[0, sigma] per sample")
    loss_range: Literal["unit", "signed"] = Field(
        "unit",
        description="pixel range of the MSE and of the discriminator's inputs: unit = images mapped to [0, 1] "
        "(upstream; the MSE is 1/4 of signed's), signed = [-1, 1]. LPIPS and ConvNeXt see the same images either way",
    )
    mse_weight: float = 1.0
    perceptual_weight: float = Field(
        1.1, ge=0, description="weight of the perceptual term (1.0 LPIPS + convnext_weight ConvNeXt) / (1 + convnext_weight); 0 turns it off"
    )
    perceptual_net: Literal["vgg", "alex", "squeeze"] = Field("vgg", description="LPIPS backbone")
    perceptual_backbone: Literal["pretrained", "random"] = Field(
        "pretrained", description="ImageNet weights of the LPIPS and ConvNeXt nets, or random (offline tests)"
    )
    convnext_weight: float = Field(
        0.1, ge=0, description="ConvNeXt logit-MSE term relative to LPIPS's 1.0 inside the perceptual term (upstream 0.1; 0 off)"
    )
    convnext_model: str = Field("convnext_small.fb_in1k", description="timm model of the ConvNeXt term (upstream: ConvNeXt-S)")
    convnext_weights: str | None = Field(
        None,
        description="safetensors file of ConvNeXt weights (timm or torchvision names; torchvision's IMAGENET1K_V1 are "
        "upstream's exact ones); default: timm's pretrained weights of convnext_model",
    )
    convnext_size: int = Field(224, gt=0, description="side the ConvNeXt term resizes images to (antialiased bilinear)")
    gan_weight: float = Field(0.1, ge=0, description="fixed adversarial weight (no adaptive weight, as upstream)")
    gan_start: Union[int, float] = Field(
        0.3,
        description="the GAN losses start after this step: an integer is a step, a float in [0, 1) a fraction of "
        "`steps` (so --steps moves it); upstream 30k of 100k in stage 1, 10k in stage 2",
    )
    disc_channels: int = Field(128, gt=0, description="width of the discriminator's first layer")
    disc_layout: Literal["upstream", "patch"] = Field(
        "upstream",
        description="upstream: widths c, c, 2c, 4c and an adaptive max-pool to 16x16 (released code); patch: widths "
        "c, 2c, 4c, 4c, no pooling (vgt's earlier layout)",
    )
    lecam_weight: float = Field(0.001, ge=0, description="LeCam regulariser of the discriminator (upstream 0.001; 0 off)")
    distill_weight: float = Field(1.0, ge=0, description="MSE to the frozen initial encoder's features")
    ema_decay: float | None = None
    ema_start: int = Field(0, ge=0, description="the EMA copies the weights until this step, then averages")
    ema_warmup: bool = Field(True, description="ramp the decay in as min(decay, (1+n)/(10+n)) (diffusers); false: constant (upstream)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step; batch_size stays the global batch")
    gradient_checkpointing: bool = False
    mixed_precision: Precision = "auto"
    crop: Literal["random", "center"] = Field(
        "random", description="square crop after resizing the shorter side: random (upstream's training) or center"
    )
    random_flip: bool = True
    streaming: bool = Field(
        False,
        description="read tar shards as a stream (webdataset): each process its own shards, no up-front index; "
        "exact resume on the same number of processes (docs/training.md#data-at-scale)",
    )
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    num_workers: int = 0
    seed: int = 0

    @field_validator("gan_start", mode="before")
    @classmethod
    def _gan_start_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would read True as step 1
            raise ValueError("gan_start must be a step (integer >= 0) or a fraction of steps in [0, 1)")
        return value

    @field_validator("gan_start")
    @classmethod
    def _gan_start(cls, value: int | float) -> int | float:
        if value < 0:
            raise ValueError("gan_start must be a step (integer >= 0) or a fraction of steps in [0, 1)")
        if isinstance(value, float) and value >= 1:
            raise ValueError("a fraction of steps (float) must be in [0, 1); write an absolute step as an integer")
        return value

    @property
    def gan_start_step(self) -> int:
        """The GAN losses are on at steps > this (1-based), i.e. from step ``gan_start_step + 1``."""
        if isinstance(self.gan_start, float):
            return round(self.gan_start * self.steps)
        return self.gan_start


# Where stage 2's recipe differs from AEStage's (stage-1) defaults: latent normalisation + noise, weaker
# distillation, lower LR, earlier GAN. A written ``stage2:`` block starts from these, not from stage 1's.
STAGE2_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4, "end_lr": 1e-5, "latent_norm": "layernorm", "noise_sigma": 0.1, "distill_weight": 0.1, "gan_start": 0.1,
}


def _stage2_defaults() -> AEStage:
    return AEStage(**STAGE2_DEFAULTS)


class AETraining(Strict):
    stage1: AEStage = Field(default_factory=AEStage)
    stage2: AEStage | None = Field(
        default_factory=_stage2_defaults, description="null: no stage 2, the stage-1 model is final (Table 5's 'stage 1 only')"
    )

    @field_validator("stage2", mode="before")
    @classmethod
    def _stage2_recipe(cls, value: Any) -> Any:
        """A ``stage2`` mapping (YAML block, ``--set train_ae.stage2.x=...``) overrides the stage-2 recipe, so that
        fields it does not name keep stage 2's values rather than AEStage's stage-1 defaults."""
        if isinstance(value, dict):
            return {**STAGE2_DEFAULTS, **value}
        return value


class ARTraining(Strict):
    """QueryAR / MAR training (paper §4.1 and upstream's configs)."""

    steps: int = Field(100_000, gt=0)
    batch_size: int = Field(
        256, gt=0, description="global batch of one optimizer step, split across processes and micro-batches (upstream: 32/GPU x 8)"
    )
    lr: float = Field(2e-4, gt=0)
    end_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(1000, ge=0)
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description="adamw (upstream); muon: torch.optim.Muon for the hidden weight matrices (the LM's and the flow "
        "head's linear layers), AdamW for the rest, at the same lr and weight_decay (Moonlight's scaling). Not for "
        "FSDP/DeepSpeed runs (docs/training.md#muon)",
    )
    grad_clip: float | None = 1.0
    ema_decay: float | None = 0.9999
    ema_start: int = Field(0, ge=0, description="the EMA copies the weights until this step, then averages (upstream 10000)")
    ema_warmup: bool = Field(True, description="ramp the decay in as min(decay, (1+n)/(10+n)) (diffusers); false: constant (upstream)")
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="probability of the unconditioned prompt (CFG)")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step; batch_size stays the global batch")
    gradient_checkpointing: bool = False
    mixed_precision: Precision = "auto"
    compile: bool = Field(
        False,
        description="torch.compile the language model and the flow head (VGTGenerator.compile): the first steps "
        "compile, later ones run fused kernels (docs/benchmarks.md#torchcompile-benchcompilepy)",
    )
    streaming: bool = Field(
        False,
        description="read tar shards as a stream (webdataset): each process its own shards, no up-front index; "
        "exact resume on the same number of processes (docs/training.md#data-at-scale)",
    )
    log_every: int = 50
    sample_every: int = 1000
    sample_count: int = Field(4, ge=0, description="captions of the batch drawn at each sample_every (0: none)")
    sample_generation: dict[str, Any] = Field(
        default_factory=lambda: {"tokens_per_step": 4, "num_sampling_steps": 10},
        description="overrides of the model's generation settings for training samples only: cheap by default",
    )
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    num_workers: int = 0
    seed: int = 0
    # REPA (docs/training.md#repa): -cos between the head's projected block feature and a frozen teacher's
    repa_weight: float = Field(0.0, ge=0, description="REPA loss weight (upstream: 0.5 in its pretrain and SFT configs); needs images, not a latent cache")
    repa_model: str = Field("vit_base_patch16_dinov3.lvd1689m", description="timm name of the frozen REPA teacher (upstream: DINOv3 ViT-B/16)")
    repa_weights: str | None = Field(
        None, description="local weights of repa_model (.safetensors; .pth/.bin read weights-only); null: timm's hub safetensors"
    )
    repa_model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments of the teacher")
    repa_image_size: int | None = Field(None, gt=0, description="side images are resized to for the teacher (null: its own, 256 for DINOv3)")

    @field_validator("sample_generation")
    @classmethod
    def _sample_generation(cls, value: dict[str, Any]) -> dict[str, Any]:
        GenerationConfig.model_validate(value)  # names the bad key and its allowed values
        return value


class GeneratorOptions(Strict):
    """Structure of the generator around the backbone (upstream layout, §3 of reference/upstream.md)."""

    head_depth: int = Field(12, gt=0, description="residual blocks of the flow-matching head")
    head_width: int = Field(1536, gt=0)
    head_batch_mul: int = Field(1, gt=0, description="t samples per token per step (MAR's diffusion_batch_mul)")
    max_grid: int = Field(64, gt=0, description="side of the learnable position/query grids; larger latents fail")
    head_time_scale: float = Field(
        1000.0,
        gt=0,
        description="the head embeds scale * t: 1 feeds t in [0, 1] as upstream's head does (converted upstream "
        "models need it); 1000 is the DiT convention, measured better in the toy world "
        "(docs/results/2026-shapes-tuning-log.md)",
    )
    time_shift: Union[float, Literal["auto"]] = Field(
        "auto", description="training noise shift; auto = sqrt(h*w*C/4096) (dimension-adaptive)"
    )
    max_prompt_tokens: int | None = Field(
        256, gt=0, description="prompts are cut to this many tokens before the image starts (upstream: 256); null: never"
    )
    repa_dim: int | None = Field(
        None, gt=0, description="REPA: width of the teacher's features; adds the head's projector to them (upstream: 768)"
    )
    repa_depth: int | None = Field(
        None, gt=0, description="REPA: the head block whose output is projected (default: max(2, head_depth // 2), upstream's)"
    )
    repa_projector_dim: int = Field(2048, gt=0, description="REPA: hidden width of the projector MLP (upstream: 2048)")
    prompt_template: str = "Generate an image: {caption}"
    uncond_prompt: str = Field("Generate an image.", description="the unconditioned branch of CFG")


GuidanceSchedule = Literal["constant", "increasing", "decreasing"]


class GenerationConfig(Strict):
    """Sampling knobs (peers' names where they exist; see docs/generation.md)."""

    tokens_per_step: Union[Annotated[int, Field(ge=1)], Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]] = Field(
        1, description="m position queries per LM pass, or a schedule"
    )
    num_sampling_steps: int = Field(30, gt=0, description="ODE/SDE steps of the flow head per token group")
    guidance_scale: float = Field(4.5, ge=0)
    guidance_schedule: GuidanceSchedule = Field(
        "constant", description="increasing: 1 -> scale (MAR's 'linear'); decreasing: scale -> 1 (upstream's 'linear')"
    )
    solver: Literal["euler", "sde"] = Field("euler", description="deterministic Euler ODE, or upstream's SDE")
    time_shift: float = Field(1.0, gt=0, description="shift of the sampling time grid (1 = none, as upstream)")
    temperature: float = Field(1.0, gt=0, description="scales the initial and SDE noise")
    order: Literal["random", "raster"] = "random"
    parallel_layout: Literal["vgt", "upstream"] = Field(
        "vgt",
        description="QueryAR, m > 1: vgt feeds [latents of the last step, next queries]; upstream re-feeds the last "
        "step's queries interleaved with their latents, [Q1, z1, ..., Qm, zm, next queries]",
    )
    step_split: Literal["fixed", "balanced"] = Field(
        "fixed",
        description="QueryAR: fixed = m tokens a step, the last step takes the rest ([3,3,3,3,3,1] for 16 at m=3); "
        "balanced = N // m steps, the remainder spread over the first ([4,3,3,3,3], upstream's)",
    )
    num_iter: int | None = Field(None, ge=1, description="MAR: AR steps (default: tokens / tokens_per_step)")
    seed: int | None = Field(
        None, ge=0, lt=2**64, description="image i of a call uses seed + i: the same image alone or in any batch"
    )
    use_cache: bool = True
    cache_implementation: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="the KV cache: dynamic grows it each pass (transformers' DynamicCache: the prefix is copied into "
        "a longer tensor every pass); static allocates the whole sequence once and writes each pass in place "
        "(StaticCache: no copy, fixed shapes for torch.compile); the same latents",
    )


class Preset(Strict):
    """A full pairing: VGT-AE components, the AR side, and the training recipes."""

    description: str = ""
    encoder: ComponentSpec
    decoder: ComponentSpec
    image_size: int | None = Field(None, description="training/eval resolution (default: the encoder's)")
    backbone: ComponentSpec | None = None
    sampler: ComponentSpec | None = None
    generator: GeneratorOptions = Field(default_factory=GeneratorOptions)
    dataset: ComponentSpec | None = Field(None, description="a registered dataset used when no --data is given")
    train_ae: AETraining = Field(default_factory=AETraining)
    train_ar: ARTraining = Field(default_factory=ARTraining)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)

    @model_validator(mode="after")
    def _repa_needs_a_projector(self) -> Preset:
        if self.train_ar.repa_weight > 0 and self.generator.repa_dim is None:
            raise ValueError(
                "train_ar.repa_weight > 0 needs generator.repa_dim, the feature width of the REPA teacher "
                f"{self.train_ar.repa_model!r} (768 for DINOv3 ViT-B/16); it is checked against the teacher when training starts"
            )
        return self


class Matrix(Strict):
    """An ablation matrix: a base preset and the fields to vary (dotted keys)."""

    description: str = ""
    base: str
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="cartesian product of dotted keys")
    cells: dict[str, dict[str, Any]] = Field(default_factory=dict, description="named cells: label -> overrides")
    metrics: list[str] = Field(default_factory=list, description="metrics to tabulate (default: all)")
    evaluators: list[ComponentSpec] = Field(
        default_factory=lambda: [ComponentSpec(name="reconstruction")],
        description="registered evaluators that score each cell (vgt_core.evaluators; default: reconstruction)",
    )
    prepare: ComponentSpec | None = Field(None, description="a registered preparation run once before the cells")

    def expand(self) -> dict[str, dict[str, Any]]:
        """Cell label -> overrides, axes first (in order), then named cells."""
        out: dict[str, dict[str, Any]] = {}
        if self.axes:
            keys = list(self.axes)
            for values in itertools.product(*(self.axes[k] for k in keys)):
                label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))
                out[label] = dict(zip(keys, values))
        out.update(self.cells)
        return out


class RegistryFile(Strict):
    presets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> preset; `base: OTHER` starts from preset OTHER (any file or plugin)"
    )
    blocks: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="name -> a mapping that any preset (any file) reuses with `use: NAME`"
    )
    matrices: dict[str, Matrix] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------------------------------------------


def _fields_at(model: type[BaseModel] | None, loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the last element of ``loc`` (to list its allowed keys)."""
    for part in loc[:-1]:
        if model is None:
            return None
        if isinstance(part, int) or part not in getattr(model, "model_fields", {}):
            continue
        model = _model_in(model.model_fields[part].annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, model: type[BaseModel] | None, where: str, prefix: str = "") -> str:
    """One line per error: ``where: prefix.key.path: what is wrong (value, allowed values)``."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
        path = ".".join([prefix] * bool(prefix) + [str(p) for p in loc]) or "(top level)"
        kind, value = err["type"], err.get("input")
        if kind == "extra_forbidden":
            owner = _fields_at(model, loc)
            allowed = ", ".join(owner.model_fields) if owner is not None else "?"
            msg = f"unknown key {loc[-1]!r}; allowed keys: {allowed}"
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "literal_error":
            msg = f"got {value!r}; allowed: {err['ctx']['expected']}"
        else:
            msg = f"{err['msg']} (got {value!r})"
        lines.append(f"{where}: {path}: {msg}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    """pydantic puts the tried member of a Union into the error location (``int``, ``literal['auto']``)."""
    return isinstance(part, str) and bool(re.fullmatch(r"int|float|str|bool|none|constrained-[a-z]+|[a-z-]+\[.*\]", part))


def validate_model(model: type[BaseModel], data: Any, where: str, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, where, prefix)) from None


def load_json_model(model: type[BaseModel], path: str | os.PathLike) -> Any:
    """A JSON file validated by ``model``; damaged JSON or a bad value is a ``ConfigError`` naming the file and key."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it as JSON: {exc}") from None
    return validate_model(model, data, str(path))


# ---------------------------------------------------------------------------------------------------------------
# Dotted overrides (matrices, CLI --set)
# ---------------------------------------------------------------------------------------------------------------


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-6`` is a number (YAML 1.1 wants ``1.0e-6`` and reads
    ``1e-6`` as text, which then broke builds that pass it on untyped, e.g. a model ``config:``)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML as the safe loader reads it, with exponent-only floats (``1e-6``, ``3E4``) read as numbers."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 -- a SafeLoader subclass


def parse_override_value(text: str) -> Any:
    """The value of a ``KEY=VALUE`` override: YAML (numbers, lists, mappings, null), ``1e-6`` a number too."""
    return load_yaml(text)


def unshared_copy(node: Any) -> Any:
    """A copy of a YAML tree in which no two places share an object. ``copy.deepcopy`` keeps the sharing that YAML
    anchors create (``*tiny_internvl3`` in encoder and backbone), so an override of one would change both."""
    if isinstance(node, dict):
        return {k: unshared_copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [unshared_copy(v) for v in node]
    return copy.deepcopy(node)


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """A copy of ``data`` with ``{"a.b.c": value}`` set; intermediate dicts are created as needed."""
    data = unshared_copy(data)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a mapping")
        node[leaf] = copy.deepcopy(value)
    return data


# ---------------------------------------------------------------------------------------------------------------
# The preset book: registry.yaml files + presets from plugins
# ---------------------------------------------------------------------------------------------------------------


COMPONENT_KEYS = ("encoder", "decoder", "backbone", "sampler", "dataset")


class PresetBook:
    """Presets, blocks and matrices from registry files and plugins, resolved and validated on access.

    Reuse across files (docs/plugins.md#presets-and-registry-files):
    - ``base: NAME`` in a preset starts from preset ``NAME``, resolved first (chains allowed), with the preset's own
      keys deep-merged over it: mappings merge key by key, lists and scalars replace. A component (``encoder``,
      ``decoder``, ...) whose ``name`` differs from the base's replaces it whole, options included.
    - ``use: NAME`` in any mapping of a preset stands for block ``NAME`` of a ``blocks:`` section, with the
      mapping's other keys deep-merged over it; such a mapping replaces what the base preset had there.
    - a string starting with ``./`` or ``../`` is a path relative to the file it is written in.
    """

    def __init__(self) -> None:
        self._presets: dict[str, tuple[dict, str]] = {}
        self._blocks: dict[str, tuple[dict, str]] = {}
        self.matrices: dict[str, tuple[Matrix, str]] = {}

    def add_file(self, path: str | os.PathLike) -> None:
        path = Path(path)
        try:
            raw = load_yaml(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from None
        parsed = validate_model(RegistryFile, _resolve_paths(raw, path.parent), str(path))
        for name, preset in parsed.presets.items():
            self._presets[name] = (preset, str(path))
        for name, block in parsed.blocks.items():
            self._blocks[name] = (block, str(path))
        for name, matrix in parsed.matrices.items():
            self.matrices[name] = (matrix, str(path))

    def add_preset(self, name: str, data: dict, source: str) -> None:
        self._presets[name] = (data, source)

    def names(self) -> list[str]:
        return sorted(self._presets)

    def blocks(self) -> dict[str, str]:
        """Block name -> the file that defines it."""
        return {name: source for name, (_, source) in sorted(self._blocks.items())}

    def source(self, name: str) -> str:
        return self._get(name)[1]

    def raw(self, name: str) -> dict:
        """Preset ``name`` as a plain dict: its base chain merged and its blocks filled in, not yet validated."""
        return self._use_blocks(self._merged(name, ()), self.source(name), f"presets.{name}")

    def _get(self, name: str) -> tuple[dict, str]:
        if name not in self._presets:
            raise ConfigError(unknown_name_message("preset", name, self._presets))
        return self._presets[name]

    def _merged(self, name: str, chain: tuple[str, ...]) -> dict:
        """Preset ``name`` over its base chain; each base is complete (blocks filled in) before the merge."""
        data, source = self._get(name)
        data = unshared_copy(data)
        base = data.pop("base", None)
        if base is None:
            return data
        where = f"{source}: presets.{name}.base"
        if not isinstance(base, str):
            raise ConfigError(f"{where}: expected a preset name, got {base!r}")
        if base in (*chain, name):
            visited = [*chain, name, base]
            cycle = " -> ".join(visited[visited.index(base):])
            raise ConfigError(f"{where}: presets extend each other in a cycle: {cycle}")
        if base not in self._presets:
            raise ConfigError(unknown_name_message("preset", base, self._presets, where))
        parent = self._use_blocks(self._merged(base, (*chain, name)), self._presets[base][1], f"presets.{base}")
        return _merge_preset(parent, data)

    def _use_blocks(self, node: Any, source: str, where: str, chain: tuple[str, ...] = ()) -> Any:
        """``node`` with every mapping that names ``use: BLOCK`` replaced by the block, its other keys merged over."""
        if isinstance(node, list):
            return [self._use_blocks(v, source, f"{where}[{i}]", chain) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            return node
        if "use" in node:
            node = dict(node)
            name = node.pop("use")
            if not isinstance(name, str) or name not in self._blocks:
                raise ConfigError(unknown_name_message("block", str(name), self._blocks, f"{source}: {where}.use"))
            if name in chain:
                raise ConfigError(f"{source}: {where}.use: blocks use each other in a cycle: {' -> '.join([*chain, name])}")
            block, block_source = self._blocks[name]
            block = self._use_blocks(block, block_source, f"blocks.{name}", (*chain, name))
            node = _merge_preset(block, node, components=False)
        return {k: self._use_blocks(v, source, f"{where}.{k}", chain) for k, v in node.items()}

    def preset(self, name: str, overrides: dict[str, Any] | None = None) -> Preset:
        """The validated preset ``name`` (with dotted overrides), its components checked against the registry."""
        source = self.source(name)
        data = self.raw(name)
        if overrides:
            data = self._use_blocks(apply_overrides(data, overrides), "overrides", f"presets.{name}")
        return check_preset(data, source, f"presets.{name}")

    def matrix(self, name: str) -> Matrix:
        if name not in self.matrices:
            raise ConfigError(unknown_name_message("matrix", name, self.matrices))
        return self.matrices[name][0]

    def check_all(self) -> None:
        """Validate every preset and every matrix cell (used by tests and ``vgt presets``)."""
        for name in self.names():
            self.preset(name)
        for name, (matrix, source) in self.matrices.items():
            if matrix.base not in self._presets:
                raise ConfigError(unknown_name_message("preset", matrix.base, self._presets, f"{source}: matrices.{name}.base"))
            for label, overrides in matrix.expand().items():
                where = f"matrices.{name}[{label}]"
                data = self._use_blocks(apply_overrides(self.raw(matrix.base), overrides), source, where)
                check_preset(data, source, where)
            check_matrix_components(matrix, f"{source}: matrices.{name}")


def _merge_preset(base: dict, preset: dict, components: bool = True) -> dict:
    """``preset``'s keys merged over ``base``'s: mappings merge key by key, lists and scalars replace; a mapping that
    names a block (``use:``) replaces what ``base`` had there, and so does a component (top level) of another
    ``name``: options of one component fit no other. Nothing is mutated or shared with the arguments."""
    out = unshared_copy(base)
    for key, value in preset.items():
        old = out.get(key)
        merge = isinstance(value, dict) and isinstance(old, dict) and "use" not in value
        if merge and components and key in COMPONENT_KEYS:
            merge = value.get("name", old.get("name")) == old.get("name")
        out[key] = _merge_preset(old, value, components=False) if merge else unshared_copy(value)
    return out


def check_matrix_components(matrix: Matrix, where: str) -> None:
    """The matrix's evaluators and preparation exist and their options are valid (names the key path)."""
    from vgt_core.plugins import registry

    reg = registry()
    specs = [(f"evaluators[{i}]", "evaluator", spec) for i, spec in enumerate(matrix.evaluators)]
    specs += [("prepare", "preparation", matrix.prepare)] if matrix.prepare is not None else []
    for key, kind, spec in specs:
        reg.get(kind, spec.name, where=f"{where}.{key}.name").validate(spec.options, where=where, prefix=f"{key}.options")


def check_preset(data: dict, source: str, prefix: str) -> Preset:
    """Validate a preset's structure, then every component's name and options against the registry."""
    from vgt_core.plugins import registry

    preset = validate_model(Preset, data, source, prefix)
    reg = registry()
    for kind in COMPONENT_KEYS:
        spec: ComponentSpec | None = getattr(preset, kind)
        if spec is None:
            continue
        component = reg.get(kind, spec.name, where=f"{source}: {prefix}.{kind}.name")
        validated = component.validate(spec.options, where=source, prefix=f"{prefix}.{kind}.options")
        spec.options = validated.model_dump(mode="json")
    return preset


def _resolve_paths(node: Any, base: Path) -> Any:
    """Every string starting with ``./`` or ``../`` made absolute against ``base`` (the registry file's folder), so
    that a registry file works from any working directory; hub ids and plain names are left as they are."""
    if isinstance(node, dict):
        return {k: _resolve_paths(v, base) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_paths(v, base) for v in node]
    if isinstance(node, str) and node.startswith(("./", "../")):
        return str((base / node).resolve())
    return node


RegistryFiles = Union[str, os.PathLike, list[Union[str, os.PathLike]], None]


def load_presets(extra_files: RegistryFiles = None) -> PresetBook:
    """The built-in ``registry.yaml``, presets registered by plugins, files named in ``VGT_REGISTRY``
    (os.pathsep-separated), then ``extra_files`` (one path or a list); later sources override earlier ones of the
    same name, and any preset may extend (``base:``) or use blocks (``use:``) of any source."""
    if isinstance(extra_files, (str, os.PathLike)):
        extra_files = [extra_files]
    from vgt_core.plugins import registry

    book = PresetBook()
    book.add_file(BUILTIN_REGISTRY)
    for name, (data, plugin) in registry().presets.items():
        book.add_preset(name, data, f"plugin {plugin}")
    env = [p for p in os.environ.get("VGT_REGISTRY", "").split(os.pathsep) if p]
    for path in [*env, *(extra_files or [])]:
        book.add_file(path)
    return book
