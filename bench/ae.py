"""VGT-AE speed per plugin: encode and decode images/s for each encoder and decoder plugin, side by side.

    python bench/ae.py [--batch 16] [--repeats 5] [--device cpu|cuda] [--json OUT]

Each row is a whole ``VGTAutoencoder`` built from a registry.yaml preset or ablation cell (random weights):
encode = ``ae.encode(images)`` (the VLM vision tower + phi + normalisation), decode = ``ae.decode(latents)`` (the
pixel decoder). Encoders: internvl3 and qwen25vl at the tiny presets' 64 px, internvl3 at the demo's 32 px, and
DC-AE's encoder (``dcae-encoder``, the pixel-VAE baseline cell). Decoders: DC-AE at 64 and 32 px, SD-VAE and the
ViT decoder of the ``decoders`` matrix (32 px). All settings are timed in interleaved rounds; medians are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import interleaved, parser, setup, write_json  # noqa: E402

# (label, preset, matrix cell or None, which half is measured)
ROWS = [
    ("internvl3", "tiny-internvl3", None, "encode"),
    ("qwen25vl", "tiny-qwen25vl", None, "encode"),
    ("internvl3", "shapes-demo", None, "encode"),
    ("dcae-encoder", "shapes-demo", ("pairing", "pixel-vae"), "encode"),
    ("dcae", "tiny-internvl3", None, "decode"),
    ("dcae", "shapes-demo", None, "decode"),
    ("sdvae", "shapes-demo", ("decoders", "sdvae"), "decode"),
    ("vit", "shapes-demo", ("decoders", "vit"), "decode"),
]


def build(preset_name: str, cell: tuple[str, str] | None, device: str):
    from vgt_core.compose import build_autoencoder
    from vgt_core.config import load_presets

    presets = load_presets()
    overrides = presets.matrix(cell[0]).expand()[cell[1]] if cell else None
    torch.manual_seed(0)
    return build_autoencoder(presets.preset(preset_name, overrides)).to(device).eval()


def main() -> None:
    p = parser(__doc__, repeats=5)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    info = setup(args)

    settings: dict[str, Any] = {}
    meta: dict[str, dict[str, Any]] = {}
    for plugin, preset_name, cell, op in ROWS:
        ae = build(preset_name, cell, args.device)
        size = ae.image_size
        images = torch.rand(args.batch, 3, size, size, device=args.device) * 2 - 1
        with torch.no_grad():
            latents = ae.encode(images)
        source = f"{cell[0]}/{cell[1]}" if cell else preset_name
        label = f"{op} {plugin} ({source}, {size} px)"
        part = ae.encoder if op == "encode" else ae.decoder
        meta[label] = {"plugin": plugin, "op": op, "source": source, "image_px": size, "latent": list(latents.shape[1:]),
                       "parameters": sum(q.numel() for q in part.parameters())}
        fn = (lambda ae=ae, x=images: ae.encode(x)) if op == "encode" else (lambda ae=ae, z=latents: ae.decode(z))
        settings[label] = torch.no_grad()(fn)

    print(f"batch {args.batch}, {args.repeats} rounds (median), random weights")
    median = interleaved(settings, args.repeats, args.device)
    print(f"\n{'setting':<52} {'params':>8} {'latent':>12} {'ms / batch':>11} {'images/s':>9}")
    rows = []
    for label, sec in median.items():
        m = meta[label]
        print(f"{label:<52} {m['parameters']:>8} {'x'.join(map(str, m['latent'])):>12} {sec * 1e3:>11.1f} {args.batch / sec:>9.1f}")
        rows.append({**m, "ms_per_batch": round(sec * 1e3, 3), "images_per_s": round(args.batch / sec, 2)})
    write_json(args.json, {**info, "script": "bench/ae.py", "command": " ".join(sys.argv), "batch": args.batch,
                           "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
