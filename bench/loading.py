"""Peak memory of loading one part of a VLM: the whole VLM then dropping half (what vgt did) vs only the part.

    python bench/loading.py [--scale 1.0] [--families internvl3 qwen25vl]

Saves a scaled-down InternVL3 and Qwen2.5-VL (random weights, bf16 safetensors like the hub's, real transformers
classes, with the full-size vocabulary so the embedding weighs what it does in the real models) to a temporary
folder, then loads each component in a fresh process and reports the peak resident memory the load added (peak
RSS minus the RSS after imports), side by side:

    whole VLM   transformers' from_pretrained in float32, then the other half dropped (vgt before)
    part fp32   the component as it loads now (load_part: meta build, only the part's tensors read)
    part bf16   the same with dtype: bfloat16

and the ratios whole / part. Nothing is downloaded. Read the ratios: absolute numbers depend on the allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = {
    # roughly InternVL3-1B's proportions (InternViT 300M : Qwen2.5-0.5B), scaled down
    "internvl3": {
        "model_type": "internvl",
        "downsample_ratio": 0.5,
        "image_token_id": 151667,
        "vision_config": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                          "intermediate_size": 2048, "image_size": [448, 448], "patch_size": [14, 14]},
        "text_config": {"model_type": "qwen2", "hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8,
                        "num_key_value_heads": 2, "intermediate_size": 2816, "vocab_size": 151936,
                        "tie_word_embeddings": True},
    },
    # roughly Qwen2.5-VL-3B's proportions (ViT 670M : LM 3.1B), scaled down
    "qwen25vl": {
        "model_type": "qwen2_5_vl",
        "vision_config": {"depth": 8, "hidden_size": 640, "intermediate_size": 1728, "num_heads": 10,
                          "out_hidden_size": 1024, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [3, 7]},
        "text_config": {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 8,
                        "num_key_value_heads": 2, "intermediate_size": 5504, "vocab_size": 151936,
                        "tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}},
    },
}
PLUGINS = {"internvl3": ("internvl3", "internvl3-lm"), "qwen25vl": ("qwen25vl", "qwen25vl-lm")}


def status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Start the peak (VmHWM) afresh, so that import-time peaks do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def child(mode: str, family: str, role: str, folder: str) -> None:
    """One load in this process; prints JSON with the memory it added."""
    import torch
    from transformers import InternVLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    from vgt_core.plugins import registry

    reg = registry()
    encoder, backbone = PLUGINS[family]
    base = status_mb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    if mode == "whole":
        cls = InternVLForConditionalGeneration if family == "internvl3" else Qwen2_5_VLForConditionalGeneration
        vlm = cls.from_pretrained(folder, dtype=torch.float32)
        if role == "encoder":
            if family == "internvl3":
                vlm.model.language_model = None
                part = vlm.model
            else:
                part = vlm.model.visual
        else:
            part = vlm.model.language_model
        del vlm
    else:
        options = {"pretrained": folder, "dtype": "bfloat16" if mode == "part-bf16" else "float32"}
        if role == "encoder" and family == "qwen25vl":
            options["image_size"] = 448
        part = reg.build(role, encoder if role == "encoder" else backbone, options)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    params = sum(p.numel() for p in part.parameters())
    print(json.dumps({"added_peak_mb": peak - base, "seconds": seconds, "params": params, "kept_mb": status_mb("VmRSS") - base}))


def make_checkpoint(family: str, folder: Path, scale: float) -> dict:
    import torch
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vgt_adapters.tokenizers import byte_level_tokenizer

    config = json.loads(json.dumps(FAMILIES[family]))
    for sub, key in (("vision_config", "num_hidden_layers"), ("vision_config", "depth"), ("text_config", "num_hidden_layers")):
        if key in config[sub]:
            config[sub][key] = max(1, round(config[sub][key] * scale))
    if family == "qwen25vl":
        depth = config["vision_config"]["depth"]
        config["vision_config"]["fullatt_block_indexes"] = [i for i in config["vision_config"]["fullatt_block_indexes"] if i < depth]
    cls, ccls = (InternVLForConditionalGeneration, InternVLConfig) if family == "internvl3" else (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig)
    model = cls(ccls.from_dict(config)).to(torch.bfloat16)
    vision = model.model.visual if family == "qwen25vl" else model.model.vision_tower
    counts = {"vision": sum(p.numel() for p in vision.parameters()),
              "lm": sum(p.numel() for p in model.model.language_model.parameters()),
              "all": sum(p.numel() for p in model.parameters())}
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return counts


def run(mode: str, family: str, role: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, family, role, str(folder)],
        check=True, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the layer counts")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    print(f"{'model':10} {'component':9} {'params':>9} | peak RSS added: {'whole VLM':>10} {'part fp32':>10} {'part bf16':>10} | "
          f"{'whole/fp32':>10} {'whole/bf16':>10} | held after: whole / fp32 / bf16")
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            folder = Path(tmp) / family
            counts = make_checkpoint(family, folder, args.scale)
            print(f"# {family}: {counts['all'] / 1e6:.0f}M parameters ({counts['vision'] / 1e6:.0f}M vision tower, "
                  f"{counts['lm'] / 1e6:.0f}M language model)")
            for role in ("encoder", "backbone"):
                whole, fp32, bf16 = (run(mode, family, role, folder) for mode in ("whole", "part-fp32", "part-bf16"))
                print(f"{family:10} {role:9} {fp32['params'] / 1e6:8.1f}M | {'':15}{whole['added_peak_mb']:8.0f}MB "
                      f"{fp32['added_peak_mb']:8.0f}MB {bf16['added_peak_mb']:8.0f}MB | "
                      f"{whole['added_peak_mb'] / fp32['added_peak_mb']:10.2f} {whole['added_peak_mb'] / bf16['added_peak_mb']:10.2f} | "
                      f"{whole['kept_mb']:.0f} / {fp32['kept_mb']:.0f} / {bf16['kept_mb']:.0f} MB")


if __name__ == "__main__":
    main()
