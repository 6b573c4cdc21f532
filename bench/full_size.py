"""Parameter counts of the full-size presets and the memory and disk they imply: computed, not measured.

    python bench/full_size.py            # configs typed in from the hub's config.json files (offline)
    python bench/full_size.py --hub      # the hub's own configs (needs the hub or its cache; still no weights)

Every preset whose components name a hub model is built with ``torch.device("meta")``: the real transformers /
diffusers / vgt classes, no weights, no memory. Its parameters are counted per component, and the bytes follow
from the counts (vgt trains fp32 weights under bf16 autocast with AdamW, an fp32 EMA of the generator, and
checkpoints weights + AdamW's m and v + EMA in fp32). Activations, the CUDA context and allocator slack are not
included: they depend on batch size, resolution and checkpointing. Prints the markdown of docs/distributed.md.
"""

from __future__ import annotations

import argparse
import copy

import torch

# The hub's config.json of each model, reduced to what the architecture reads (the rest is at its default).
PUBLISHED: dict[str, dict] = {
    "OpenGVLab/InternVL3-1B-hf": {
        "model_type": "internvl", "downsample_ratio": 0.5, "image_token_id": 151667, "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "internvl_vision", "hidden_size": 1024, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "intermediate_size": 4096, "image_size": [448, 448],
                          "patch_size": [14, 14], "attention_bias": True, "use_qk_norm": False,
                          "layer_scale_init_value": 0.1, "norm_type": "layer_norm", "use_mean_pooling": True},
        "text_config": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                        "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151674,
                        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    },
    "OpenGVLab/InternVL3-2B-hf": {
        "model_type": "internvl", "downsample_ratio": 0.5, "image_token_id": 151667, "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "internvl_vision", "hidden_size": 1024, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "intermediate_size": 4096, "image_size": [448, 448],
                          "patch_size": [14, 14], "attention_bias": True, "use_qk_norm": False,
                          "layer_scale_init_value": 0.1, "norm_type": "layer_norm", "use_mean_pooling": True},
        "text_config": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                        "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151674,
                        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": False},
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "model_type": "qwen2_5_vl", "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": True,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                          "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3},
        "text_config": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16,
                        "num_key_value_heads": 2, "intermediate_size": 11008, "vocab_size": 151936,
                        "max_position_embeddings": 128000, "tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                            "mrope_section": [16, 24, 24]}},
    },
    "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers": {
        "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
        "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
        "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "upsample_block_type": "interpolate", "downsample_block_type": "Conv", "decoder_norm_types": "rms_norm",
        "decoder_act_fns": "silu", "scaling_factor": 0.41407,
    },
}
# totals the model cards state, to check the typed-in configs against
CARD_TOTALS = {"OpenGVLab/InternVL3-1B-hf": 0.938e9, "OpenGVLab/InternVL3-2B-hf": 2.09e9, "Qwen/Qwen2.5-VL-3B-Instruct": 3.75e9}

GPUS = 8
GB = 1e9


def offline(spec: dict) -> dict:
    """A component spec with its hub model replaced by the typed-in config (merged under the preset's overrides)."""
    from vgt_adapters.hf_common import deep_merge

    spec = copy.deepcopy(spec)
    options = spec.get("options") or {}
    source = options.get("pretrained")
    if source in PUBLISHED:
        options["config"] = deep_merge(PUBLISHED[source], options.get("config") or {})
        options["pretrained"] = None
        if spec["name"].endswith("-lm"):
            options["tokenizer"] = "byte-level"  # a stand-in for the hub's: a tokenizer has no parameters
    options["load_weights"] = False
    spec["options"] = options
    return spec


def count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def full_size_presets() -> list[str]:
    from vgt_core.config import load_presets

    book = load_presets()
    return [n for n in book.names() if any(
        isinstance(c, dict) and str((c.get("options") or {}).get("pretrained", "")).count("/") == 1
        for c in (book.raw(n).get(k) for k in ("encoder", "decoder", "backbone")))]


def build_counts(name: str, hub: bool) -> dict[str, int]:
    from vgt_core.compose import build
    from vgt_core.config import load_presets

    preset = load_presets().preset(name).model_dump(mode="json")
    for role in ("encoder", "decoder", "backbone"):
        preset[role] = offline(preset[role]) if not hub else {**preset[role], "options": {**preset[role]["options"], "load_weights": False}}
    with torch.device("meta"):
        ae, gen = build(preset)
    return {
        "encoder": count(ae.encoder), "projection": count(ae.projection), "decoder": count(ae.decoder),
        "ae": count(ae), "lm": count(gen.backbone), "head": count(gen) - count(gen.backbone), "generator": count(gen),
    }


def check_published() -> list[str]:
    """Whole VLMs built from the typed-in configs vs the totals of their model cards."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    rows = []
    for source, total in CARD_TOTALS.items():
        data = copy.deepcopy(PUBLISHED[source])
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(config)
        model.tie_weights()  # as from_pretrained does (construction on meta leaves them untied)
        rows.append(f"| {source} | {count(model) / 1e9:.3f} B | {total / 1e9:.3f} B |")
    return rows


def gb(n: float) -> str:
    return f"{n / GB:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hub", action="store_true", help="read the configs from the hub instead of the typed-in ones")
    args = parser.parse_args()
    source = "the hub's configs" if args.hub else "configs typed in from the hub's config.json (computed from published config)"
    rows = {name: build_counts(name, args.hub) for name in full_size_presets()}

    print(f"Parameters ({source}; built on the meta device, M = 10^6):\n")
    print("| preset | VLM encoder | phi | pixel decoder | VGT-AE | LM (base, no head) | flow head + grids | generator |")
    print("|---|---|---|---|---|---|---|---|")
    for name, c in rows.items():
        print(f"| `{name}` | {c['encoder'] / 1e6:.0f} M | {c['projection'] / 1e6:.1f} M | {c['decoder'] / 1e6:.0f} M | "
              f"{c['ae'] / 1e6:.0f} M | {c['lm'] / 1e6:.0f} M | {c['head'] / 1e6:.0f} M | {c['generator'] / 1e6:.0f} M |")
    if not args.hub:
        print("\nCheck of the typed-in configs: the whole VLM built from them vs its model card\n")
        print("| model | built | model card |\n|---|---|---|")
        print("\n".join(check_published()))

    print(f"\nBytes, in GB (10^9), of the trained part P: training = the VGT-AE for `train-ae` (all of it trains: the "
          f"encoder at lr x encoder_lr_mult), the generator for `train-ar`.\n")
    print("| preset | stage | P | bf16 weights (2P) | fp32 weights + grads (8P) | AdamW m, v (8P) | EMA (4P) | "
          f"checkpoint on disk | per GPU, DDP | per GPU, ZeRO-3 / FSDP over {GPUS} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, c in rows.items():
        for stage, p, ema in (("train-ae", c["ae"], False), ("train-ar", c["generator"], True)):
            state = 8 * p + 8 * p + (4 * p if ema else 0)  # weights + grads, AdamW, EMA
            disk = 4 * p + 8 * p + (4 * p if ema else 0)
            print(f"| `{name}` | {stage} | {p / 1e9:.2f} B | {gb(2 * p)} | {gb(8 * p)} | {gb(8 * p)} | "
                  f"{gb(4 * p) if ema else '-'} | {gb(disk)} | {gb(state)} | {gb(state / GPUS)} |")


if __name__ == "__main__":
    main()
