"""The demo's human-readable outputs: ``samples.png`` (labelled grid), ``curves.png`` (losses), ``report.md``."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402


def _first_sample(folder: Path) -> list[tuple[str, str, Image.Image]]:
    """(tag, prompt, first image) for every prompt folder of a GenEval-layout folder."""
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.name.isdigit()):
        meta = json.loads((sub / "metadata.jsonl").read_text())
        rows.append((meta["tag"], meta["prompt"], Image.open(sub / "samples" / "0000.png").convert("RGB")))
    return rows


def samples_grid(out: Path, settings: list[tuple[str, str]], per_task: int = 2) -> Path:
    """Columns: ``per_task`` prompts of every task; rows: the tokens-per-step settings."""
    by_setting = {label: _first_sample(out / folder) for label, folder in settings}
    first = next(iter(by_setting.values()))
    picked, seen = [], {}
    for i, (tag, _, _) in enumerate(first):
        if seen.get(tag, 0) < per_task:
            picked.append(i)
            seen[tag] = seen.get(tag, 0) + 1
    fig, axes = plt.subplots(len(settings), len(picked), figsize=(1.6 * len(picked), 1.9 * len(settings) + 0.8), squeeze=False)
    for r, (label, _) in enumerate(settings):
        for c, i in enumerate(picked):
            tag, prompt, image = by_setting[label][i]
            ax = axes[r][c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("\n".join(textwrap.wrap(prompt.replace("a photo of ", ""), 16)), fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.tight_layout()
    path = out / "samples.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(out: Path, understanding_losses: list[float], logs: dict[str, list[dict]]) -> Path:
    panels = [("VLM understanding (caption CE)", [(list(range(1, len(understanding_losses) + 1)), understanding_losses, "loss")])]
    for name, keys in (("ae-stage1", ("mse", "distill")), ("ae-stage2", ("mse",)), ("ar", ("loss",))):
        rows = logs.get(name, [])
        panels.append((name, [([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r], k) for k in keys]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3))
    for ax, (title, series) in zip(axes, panels):
        for x, y, label in series:
            if y:
                ax.plot(x, y, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out: Path, metrics: dict[str, Any], understanding_losses: list[float], logs: dict[str, list[dict]]) -> None:
    settings = [(f"{key.split('=')[1]} tok/step", "geneval" if key.endswith("=1") else f"geneval-m{key.split('=')[1]}") for key in metrics["generation"]]
    samples_grid(out, settings)
    curves(out, understanding_losses, logs)
    gen = metrics["generation"]
    tasks = sorted(next(iter(gen.values()))["geneval"])
    lines = [
        "# vgt demo: the shapes world",
        "",
        f"Mode: {metrics['mode']}; images {metrics['image_size']} px; total {metrics['seconds']['total']:.0f} s.",
        "",
        "## Understanding (the VLM before generation tuning)",
        "",
        "| | token accuracy | shape words | colour words | descriptions fully right |",
        "|---|---|---|---|---|",
        *(f"| {k} | {v['token_accuracy']:.3f} | {v['shape_accuracy']:.3f} | {v['color_accuracy']:.3f} | {v['exact_match']:.3f} |"
          for k, v in metrics["understanding"].items()),
        "",
        "## Reconstruction (VGT-AE after stage 2, held-out images)",
        "",
        f"PSNR {metrics['reconstruction']['psnr']:.2f} dB, SSIM {metrics['reconstruction']['ssim']:.4f} "
        f"({metrics['reconstruction']['images']} images).",
        "",
        "## Generation (mini-GenEval on held-out prompts)",
        "",
        "| tokens per step | LM passes | " + " | ".join(tasks) + " | overall | seconds |",
        "|---" * (len(tasks) + 4) + "|",
        *(
            f"| {key.split('=')[1]} | {v['lm_passes']} | " + " | ".join(f"{v['geneval'][t]:.2f}" for t in tasks)
            + f" | {v['overall']:.3f} | {v['seconds']:.1f} |"
            for key, v in gen.items()
        ),
        "",
        "## Targets (full mode, 2-core CPU)",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
        *(
            f"| {name} | {'<=' if name == 'total_seconds' else '>='} {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |"
            for name, t in metrics.get("targets", {}).items()
        ),
        "",
        "## Wall time per phase (s)",
        "",
        *(f"- {name}: {sec:.0f}" for name, sec in metrics["seconds"].items()),
        "",
        "![samples](samples.png)",
        "",
        "![curves](curves.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
