"""Released upstream VGT checkpoints (github.com/hustvl/VGT) -> vgt's models.

Upstream saves PyTorch state dicts of its own modules (reference/upstream.md §4): a VGT-AE file
(``vgt_ae_internvl3.pth``, ``vgt_ae_qwen25vl.pth``) and mmengine AR checkpoints (``iter_5000.pth``) that hold
the language model, QueryAR's grids, the projectors, the flow head and a copy of the VGT-AE under ``vgt_ae.``.
This module reads such files without running code from them, renames every tensor to vgt's names (§9 of the
reference lists the mapping that loads strictly into the transformers 5.x classes), and refuses anything it
cannot account for: every upstream key is either mapped or dropped for a named reason (``DROPPED``), and every
parameter of the target model must receive a tensor.

    from vgt_adapters.upstream import convert_upstream
    convert_upstream("vgt-internvl3-1.6b", "models/vgt-internvl3", ae="vgt_ae_internvl3.pth", ar="iter_5000.pth")

The target architecture comes from a preset, built with ``load_weights: false`` (configs and tokenizers only,
no weights are downloaded); the result is written with vgt's own ``save_pretrained``.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vgt_core.errors import VGTError
from vgt_core.serialization import check_output, weights_only_refusal

AE_PREFIX = "vgt_ae."
#: Both released VGT-AEs normalise their latent per position over the channels (``encoder_norm=True``), and the
#: AR models were trained on, and renormalise their samples to, such latents.
UPSTREAM_LATENT_NORM = "layernorm"
LIST_AT_MOST = 12


class UpstreamCheckpointError(VGTError):
    """An upstream checkpoint that cannot be read, or whose keys do not match the target model."""


# ---------------------------------------------------------------------------------------------------------------
# What is deliberately left out
# ---------------------------------------------------------------------------------------------------------------

#: Upstream keys with no counterpart in vgt's models (pattern on the key after unwrapping -> why it is dropped).
DROPPED: dict[str, str] = {
    r"^(vgt_ae\.)?teacher(_mlp1)?\.": "the VGT-AE's self-distillation teacher (a frozen copy of the encoder and "
    "mlp1, used only to train the AE)",
    r"^lmm\.(.+\.)?lm_head\.": "the VLM's LM head (vgt reads hidden states, never logits)",
    r"^dinov3_extractor\.": "REPA's DINOv3 teacher (AR pretraining only)",
    r"^steps$": "mmengine's EMA step counter",
}
#: Dropped only when the target model has no place for them.
REPA_PROJECTOR = r"^image_head\.net\.repa_projector\."
REPA_DROPPED = "the flow head's REPA projector (AR pretraining only; the target head has none)"
LM_ALIAS_DROPPED = (
    "the second copy of Qwen2.5-VL's language model (upstream's pruned LM is registered twice; checked equal to "
    "the copy under lmm.model.language_model.)"
)


# ---------------------------------------------------------------------------------------------------------------
# Key mapping (reference/upstream.md §4 and §9)
# ---------------------------------------------------------------------------------------------------------------

Rule = tuple[str, str]  # (regex matching a key prefix, replacement); the rest of the key is kept
QKV = "<qkv>"  # marks a fused q/k/v projection, split row-wise into three target keys

_VIT = "encoder.tower.vision_tower."
_LAYER = r"^encoder\.encoder\.layers\.(\d+)\."
#: InternViT (InternVL's remote code, ``vision_model``) -> transformers' ``InternVLVisionModel``; upstream's
#: ``mlp1`` -> ``InternVLMultiModalProjector``.
INTERNVIT_RULES: list[Rule] = [
    (r"^encoder\.embeddings\.class_embedding$", _VIT + "embeddings.cls_token"),
    (r"^encoder\.embeddings\.position_embedding$", _VIT + "embeddings.position_embeddings"),
    (r"^encoder\.embeddings\.patch_embedding\.", _VIT + "embeddings.patch_embeddings.projection."),
    (_LAYER + r"attn\.qkv\.", _VIT + r"encoder.layer.\1.attention." + QKV + "."),
    (_LAYER + r"attn\.proj\.", _VIT + r"encoder.layer.\1.attention.projection_layer."),
    (_LAYER + r"attn\.(q|k)_norm\.", _VIT + r"encoder.layer.\1.attention.\2_norm."),
    (_LAYER + r"norm1\.", _VIT + r"encoder.layer.\1.layernorm_before."),
    (_LAYER + r"norm2\.", _VIT + r"encoder.layer.\1.layernorm_after."),
    (_LAYER + r"ls1$", _VIT + r"encoder.layer.\1.lambda_1"),
    (_LAYER + r"ls2$", _VIT + r"encoder.layer.\1.lambda_2"),
    (_LAYER + r"mlp\.(fc1|fc2)\.", _VIT + r"encoder.layer.\1.mlp.\2."),
    (r"^mlp1\.0\.", "encoder.tower.multi_modal_projector.layer_norm."),
    (r"^mlp1\.1\.", "encoder.tower.multi_modal_projector.linear_1."),
    (r"^mlp1\.3\.", "encoder.tower.multi_modal_projector.linear_2."),
]
#: Qwen2.5-VL's vision tower (with its patch merger) keeps the transformers names (4.57 and 5.x agree).
QWEN_VIT_RULES: list[Rule] = [(r"^encoder\.", "encoder.tower.")]
#: Per vgt encoder plugin: the rules of upstream's AE encoder for that VLM.
ENCODER_RULES: dict[str, list[Rule]] = {"internvl3": INTERNVIT_RULES, "qwen25vl": QWEN_VIT_RULES}
#: phi (residual blocks + final MLP) and the DC-AE decoder (diffusers names on both sides).
AE_RULES: list[Rule] = [
    (r"^down_blocks\.(\d+)\.", r"projection.blocks.\1."),
    (r"^down_mlp\.", "projection.down."),
    (r"^decoder\.", "decoder.decoder."),
]
_HEAD = r"^image_head\.net\."
#: VGT_InternVL3 / VGT_Qwen25VL around the language model -> ``VGTGenerator`` with QueryAR and ``FlowHead``.
GENERATOR_RULES: list[Rule] = [
    (r"^adaptive_metaquery\.max_metaquery$", "sampler.query_grid"),
    (r"^adaptive_metaquery\.pos_encoding\.grid_embed$", "position_grid"),
    (r"^image_in_projector\.", "latent_in."),
    (r"^image_out_projector\.", "latent_out."),
    (_HEAD + r"input_proj\.", "head.input_proj."),
    (_HEAD + r"cond_embed\.", "head.cond_embed."),
    (_HEAD + r"time_embed\.mlp\.(0|2)\.", r"head.time_embed.\1."),
    (_HEAD + r"res_blocks\.(\d+)\.in_ln\.", r"head.blocks.\1.norm."),
    (_HEAD + r"res_blocks\.(\d+)\.mlp\.(0|2)\.", r"head.blocks.\1.mlp.\2."),
    (_HEAD + r"res_blocks\.(\d+)\.adaLN_modulation\.1\.", r"head.blocks.\1.modulation.1."),
    (_HEAD + r"final_layer\.adaLN_modulation\.1\.", "head.final_modulation.1."),
    (_HEAD + r"final_layer\.linear\.", "head.final."),
    (_HEAD + r"repa_projector\.(0|2|4)\.", r"head.repa_projector.\1."),
]
#: Where the language model sits, by upstream model: InternVL's chat model holds a Qwen2ForCausalLM
#: (``language_model.model``); Qwen2.5-VL (transformers 4.57) holds its text model at ``model.language_model``
#: and, after upstream's pruning assignment, again at ``language_model``.
LM_INTERNVL = "lmm.language_model.model."
LM_QWEN = "lmm.model.language_model."
LM_QWEN_ALIAS = "lmm.language_model."


def _apply(rules: list[Rule], key: str) -> str | None:
    for pattern, replacement in rules:
        match = re.match(pattern, key)
        if match:
            return match.expand(replacement) + key[match.end() :]
    return None


def _dropped_reason(key: str) -> str | None:
    return next((why for pattern, why in DROPPED.items() if re.search(pattern, key)), None)


# ---------------------------------------------------------------------------------------------------------------
# Reading files without running their code
# ---------------------------------------------------------------------------------------------------------------

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def _resave_hint(path: Path) -> str:
    out = path.with_suffix(".safetensors")
    return (
        "If you trust the file, re-save its tensors as safetensors in your own environment and convert that file:\n"
        "  python -c \"import torch; from safetensors.torch import save_file; "
        f"ck = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = ck.get('ema_state_dict') or ck.get('state_dict') or ck.get('model') or ck; "
        "save_file({k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
        f"'{out}')\""
    )


def load_file(path: str | os.PathLike) -> Any:
    """The object stored in a ``.safetensors`` file, or in a torch file loaded with ``weights_only=True`` (tensors,
    containers and plain values only: a file that needs code to unpickle is refused, nothing of it runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path))
        except SafetensorError as exc:
            raise UpstreamCheckpointError(f"{path}: cannot read as safetensors: {exc}") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise UpstreamCheckpointError(f"{path}: unknown checkpoint format; expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as exc:
        raise UpstreamCheckpointError(f"{path}: cannot read as a torch checkpoint: {exc}") from None
    except pickle.UnpicklingError as exc:
        why = weights_only_refusal(exc)
        raise UpstreamCheckpointError(
            f"{path}: refused: the file holds Python objects other than tensors and plain containers, and "
            f"unpickling them would run code from the file (torch's weights_only loader: {why}).\n" + _resave_hint(path)
        ) from None


def unwrap_state_dict(obj: Any, *, prefer_ema: bool, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict inside a checkpoint object and where it was found.

    ``ema_state_dict`` (mmengine's EMA weights, when ``prefer_ema``), else ``state_dict``, else ``model``, else the
    object itself. A leading ``module.`` (DDP, mmengine's EMA wrapper) is stripped from every key."""
    if not isinstance(obj, dict):
        raise UpstreamCheckpointError(f"{source}: expected a dict of tensors, found {type(obj).__name__}")
    entries = (["ema_state_dict"] if prefer_ema else []) + ["state_dict", "model"]
    entry = next((e for e in entries if isinstance(obj.get(e), dict)), None)
    state = obj[entry] if entry else obj
    where = entry or "top level"
    out: dict[str, torch.Tensor] = {}
    bad = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            bad.append(key)
            continue
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in out:
            raise UpstreamCheckpointError(f"{source}: key {name!r} appears with and without a 'module.' prefix")
        out[name] = value
    if bad:
        raise UpstreamCheckpointError(
            f"{source} ({where}): entries that are not tensors: {_listing(bad)}; expected a state dict "
            f"(bare, or under 'state_dict', 'model' or 'ema_state_dict')"
        )
    return out, where


def read_checkpoint(path: str | os.PathLike, *, prefer_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint file's state dict (see ``unwrap_state_dict``) and the entry it came from."""
    return unwrap_state_dict(load_file(path), prefer_ema=prefer_ema, source=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Mapping state dicts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Mapped:
    """Target key -> tensor for one vgt model, with the upstream key each came from."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def put(self, target: str, tensor: torch.Tensor, source: str, problems: list[str]) -> None:
        if target in self.tensors:
            problems.append(f"{source} and {self.sources[target]} both map to {target}")
            return
        self.tensors[target] = tensor
        self.sources[target] = source


@dataclass
class Conversion:
    """The result of mapping upstream state dicts: tensors per vgt model, what was dropped and why."""

    autoencoder: Mapped = field(default_factory=Mapped)
    generator: Mapped = field(default_factory=Mapped)
    dropped: dict[str, list[str]] = field(default_factory=dict)
    overridden: list[str] = field(default_factory=list)  # AE keys of --ae replaced by the AR file's vgt_ae.*
    differing: list[str] = field(default_factory=list)  # ... of which the values differed

    def drop(self, key: str, why: str) -> None:
        self.dropped.setdefault(why, []).append(key)


def _map_ae_key(key: str, tensor: torch.Tensor, encoder_rules: list[Rule], out: Mapped, source: str, problems: list[str]) -> bool:
    target = _apply(encoder_rules, key) or _apply(AE_RULES, key)
    if target is None:
        return False
    if QKV in target:
        if tensor.shape[0] % 3:
            problems.append(f"{source}: a fused q/k/v of {tensor.shape[0]} rows cannot split in three")
            return True
        for name, part in zip("qkv", tensor.chunk(3, dim=0)):
            out.put(target.replace(QKV, f"{name}_proj"), part, source, problems)
    else:
        out.put(target, tensor, source, problems)
    return True


def map_autoencoder(
    state: dict[str, torch.Tensor], encoder: str, conversion: Conversion, problems: list[str], unknown: list[str], prefix: str = ""
) -> Mapped:
    """Map an upstream VGT-AE state dict (keys without ``vgt_ae.``) into a fresh ``Mapped``."""
    if encoder not in ENCODER_RULES:
        raise UpstreamCheckpointError(
            f"upstream checkpoints hold an InternVL3 or Qwen2.5-VL VGT-AE; the preset's encoder is {encoder!r} "
            f"(known: {', '.join(ENCODER_RULES)})"
        )
    out = Mapped()
    for key, tensor in state.items():
        source = prefix + key
        why = _dropped_reason(source)
        if why:
            conversion.drop(source, why)
        elif not _map_ae_key(key, tensor, ENCODER_RULES[encoder], out, source, problems):
            unknown.append(source)
    return out


def _lm_layout(keys: list[str]) -> tuple[str, str | None]:
    """The prefix of the language model's weights and that of a duplicate copy (Qwen2.5-VL), if any."""
    if any(k.startswith(LM_INTERNVL) for k in keys):
        return LM_INTERNVL, None
    if any(k.startswith(LM_QWEN) for k in keys):
        return LM_QWEN, LM_QWEN_ALIAS
    return LM_QWEN_ALIAS, None  # a Qwen2.5-VL file holding only the second copy


def map_generator(
    state: dict[str, torch.Tensor], target_keys: set[str], conversion: Conversion, problems: list[str], unknown: list[str]
) -> Mapped:
    """Map an upstream AR state dict's non-AE keys; ``target_keys`` says whether the head has a REPA projector."""
    out = Mapped()
    lm, alias = _lm_layout(list(state))
    has_repa = any(k.startswith("head.repa_projector.") for k in target_keys)
    for key, tensor in state.items():
        why = _dropped_reason(key)
        if why:
            conversion.drop(key, why)
            continue
        if re.match(REPA_PROJECTOR, key) and not has_repa:
            conversion.drop(key, REPA_DROPPED)
            continue
        if alias is not None and key.startswith(alias) and not key.startswith(lm):
            twin = lm + key[len(alias) :]
            if twin not in state:
                problems.append(f"{key} has no counterpart {twin} (the two copies of the language model differ in keys)")
            elif state[twin].shape != tensor.shape or not torch.equal(state[twin], tensor):
                problems.append(f"{key} differs from {twin}: the checkpoint's two copies of the language model disagree")
            else:
                conversion.drop(key, LM_ALIAS_DROPPED)
            continue
        if key.startswith(lm):
            out.put("backbone.lm." + key[len(lm) :], tensor, key, problems)
            continue
        target = _apply(GENERATOR_RULES, key)
        if target is None:
            unknown.append(key)
        else:
            out.put(target, tensor, key, problems)
    return out


def _listing(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:LIST_AT_MOST])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > LIST_AT_MOST else "")


def _count(keys: set[str] | list[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def _depth_hints(mapped: set[str], target: set[str]) -> list[str]:
    hints = []
    for prefix, knob in (
        ("backbone.lm.layers.", "backbone.options.config.text_config.num_hidden_layers"),
        ("head.blocks.", "generator.head_depth"),
    ):
        have, want = _count(mapped, prefix), _count(target, prefix)
        if have and want and have != want:
            hints.append(f"the checkpoint has {have} {prefix[:-1]} and the preset {want}: set {knob}={have}")
    return hints


def check_against(mapped: Mapped, target: dict[str, torch.Size], what: str) -> list[str]:
    """Problems between mapped tensors and a model's state dict: keys the model lacks, keys it has that nothing
    filled, shapes that differ."""
    problems = []
    extra = [f"{mapped.sources[k]} -> {k}" for k in mapped.tensors if k not in target]
    missing = [k for k in target if k not in mapped.tensors]
    shapes = [
        f"{mapped.sources[k]} {tuple(t.shape)} -> {k} {tuple(target[k])}"
        for k, t in mapped.tensors.items()
        if k in target and tuple(t.shape) != tuple(target[k])
    ]
    if extra:
        problems.append(f"{what}: upstream tensors mapped to keys the model does not have: {_listing(extra)}")
    if missing:
        problems.append(f"{what}: model keys that no upstream tensor fills: {_listing(missing)}")
    if shapes:
        problems.append(f"{what}: shapes differ: {_listing(shapes)}")
    if extra or missing:
        problems += [f"{what}: {hint}" for hint in _depth_hints(set(mapped.tensors), set(target))]
    return problems


def convert_state_dicts(
    *,
    encoder: str,
    ae_target: dict[str, torch.Size],
    ae_state: dict[str, torch.Tensor] | None = None,
    ar_state: dict[str, torch.Tensor] | None = None,
    generator_target: dict[str, torch.Size] | None = None,
) -> Conversion:
    """Map upstream state dicts onto vgt's keys and check them against the target models' state dicts.

    ``ae_state``: a VGT-AE file (keys ``encoder.``, ``mlp1.``, ``down_blocks.``, ``down_mlp.``, ``decoder.``,
    ``teacher*.``). ``ar_state``: an AR file; its ``vgt_ae.*`` tensors override ``ae_state``'s (upstream loads the
    AR checkpoint after the AE one). ``encoder``: the preset's encoder plugin name. Raises
    ``UpstreamCheckpointError`` listing every unknown key, missing key, shape mismatch and duplicate."""
    conversion, problems, unknown = Conversion(), [], []
    ae = map_autoencoder(ae_state, encoder, conversion, problems, unknown) if ae_state is not None else Mapped()
    if ar_state is not None:
        if generator_target is None:
            raise ValueError("an AR checkpoint needs the generator's state dict to map onto")
        inner = {k[len(AE_PREFIX) :]: v for k, v in ar_state.items() if k.startswith(AE_PREFIX)}
        rest = {k: v for k, v in ar_state.items() if not k.startswith(AE_PREFIX)}
        if inner:
            from_ar = map_autoencoder(inner, encoder, conversion, problems, unknown, prefix=AE_PREFIX)
            for key, tensor in from_ar.tensors.items():
                if key in ae.tensors:
                    conversion.overridden.append(key)
                    old = ae.tensors[key]
                    if old.shape != tensor.shape or not torch.equal(old.to(tensor.dtype), tensor):
                        conversion.differing.append(key)
                ae.tensors[key], ae.sources[key] = tensor, from_ar.sources[key]
        conversion.generator = map_generator(rest, set(generator_target), conversion, problems, unknown)
        problems += check_against(conversion.generator, generator_target, "generator")
    conversion.autoencoder = ae
    if unknown:
        problems.insert(0, f"upstream keys that vgt does not know (neither mapped nor a deliberate drop): {_listing(unknown)}")
    if not ae.tensors:
        problems.append("no VGT-AE weights: pass the AE file (--ae) or an AR file that holds vgt_ae.*")
    else:
        problems += check_against(ae, ae_target, "autoencoder")
    if problems:
        raise UpstreamCheckpointError("the upstream checkpoint does not match the preset's model:\n  " + "\n  ".join(problems))
    return conversion


# ---------------------------------------------------------------------------------------------------------------
# The whole conversion: preset -> empty models -> mapped weights -> a vgt folder
# ---------------------------------------------------------------------------------------------------------------


def architecture_only(preset: Any) -> Any:
    """A copy of ``preset`` whose components build their architecture without loading weights."""
    from vgt_core.config import check_preset
    from vgt_core.plugins import registry

    data = preset.model_dump(mode="json")
    reg = registry()
    for kind in ("encoder", "decoder", "backbone"):
        spec = data.get(kind)
        if spec and "load_weights" in reg.get(kind, spec["name"]).options.model_fields:
            spec["options"] = {**spec.get("options", {}), "load_weights": False}
    return check_preset(data, "<convert-upstream>", "preset")


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def convert_upstream(
    preset: Any,
    out: str | os.PathLike,
    *,
    ae: str | os.PathLike | None = None,
    ar: str | os.PathLike | None = None,
    registry: list[str | os.PathLike] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert upstream checkpoint files into a vgt folder and return a report.

    With ``ar``: a pipeline folder (``autoencoder/``, ``generator/``, ``generation.json`` from the preset's
    ``generation``) for ``VGTPipeline.from_pretrained``; the VGT-AE comes from ``ae`` and/or the AR file's
    ``vgt_ae.*`` (which wins). Without ``ar``: a VGT-AE folder for ``VGTAutoencoder.from_pretrained``.
    ``preset``: a name (from the built-in registry, ``registry`` files and plugins) or a ``Preset``/dict."""
    from vgt_core.autoencoder import FORMAT as AE_FORMAT
    from vgt_core.autoencoder import VGTAutoencoder
    from vgt_core.compose import build_generator, resolve
    from vgt_core.config import apply_overrides, load_presets
    from vgt_core.pipeline import VGTPipeline

    if ae is None and ar is None:
        raise UpstreamCheckpointError("nothing to convert: pass an AE file, an AR file, or both")
    # Before any work: ``out`` is new, empty or an earlier conversion of the same kind (replaced as a whole).
    check_output(out, "vgt-pipeline" if ar is not None else AE_FORMAT, "replace")
    if isinstance(preset, str):
        preset = load_presets(registry).preset(preset, overrides)
    else:
        data = preset.model_dump(mode="json") if hasattr(preset, "model_dump") else preset
        preset = resolve(apply_overrides(data, overrides) if overrides else data)
    ae_state = read_checkpoint(ae, prefer_ema=False) if ae is not None else (None, None)
    ar_state = read_checkpoint(ar, prefer_ema=True) if ar is not None else (None, None)
    if ar is not None and (preset.backbone is None or preset.sampler is None):
        raise UpstreamCheckpointError("an AR checkpoint needs a preset with a backbone and a sampler")

    target = architecture_only(preset)
    final_stage = target.train_ae.stage2 or target.train_ae.stage1
    autoencoder = VGTAutoencoder.from_specs(
        target.encoder.model_dump(),
        target.decoder.model_dump(),
        image_size=target.image_size,
        latent_norm=UPSTREAM_LATENT_NORM,
        noise_sigma=final_stage.noise_sigma,  # training only; kept for fine-tuning the converted AE
    )
    generator = build_generator(target, autoencoder) if ar is not None else None
    conversion = convert_state_dicts(
        encoder=target.encoder.name,
        ae_target=_shapes(autoencoder),
        ae_state=ae_state[0],
        ar_state=ar_state[0],
        generator_target=_shapes(generator) if generator is not None else None,
    )
    autoencoder.load_state_dict(conversion.autoencoder.tensors, strict=True)
    if generator is not None:
        generator.load_state_dict(conversion.generator.tensors, strict=True)
        VGTPipeline(autoencoder, generator, target.generation).save_pretrained(out)
        kind = "pipeline"
    else:
        autoencoder.eval().save_pretrained(out)
        kind = "autoencoder"
    return {
        "out": str(out),
        "kind": kind,
        "ae_entry": ae_state[1],
        "ar_entry": ar_state[1],
        "autoencoder_tensors": len(conversion.autoencoder.tensors),
        "generator_tensors": len(conversion.generator.tensors),
        "ae_overridden_by_ar": len(conversion.overridden),
        "ae_differing_from_ar": len(conversion.differing),
        "dropped": {why: len(keys) for why, keys in conversion.dropped.items()},
    }
