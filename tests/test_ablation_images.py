"""`vgt ablate` on a folder of real images: a matrix of autoencoder cells scored by the reconstruction evaluator
alone (no generator trained), shared artefacts, resume, and an evaluator plugin of one's own."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFilter

from vgt_core import hookimpl
from vgt_core.ablation import Budget, run_ablation
from vgt_core.cli import main
from vgt_core.errors import ConfigError
from vgt_core.plugins import register_plugin, unregister_plugin
from vgt_core.registry import Options

# Reconstruction loss alone at batch 4: the perceptual and GAN losses would spend most of the test's time.
FAST = {f"train_ae.stage{i}.{key}": value for i in (1, 2) for key, value in
        (("perceptual_weight", 0), ("gan_weight", 0), ("batch_size", 4))}  # fmt: skip
STEPS = ["--steps", "2", "--quiet", *(f"--set={k}={v}" for k, v in FAST.items())]


def photo(rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A photo-like image: a smooth two-colour gradient, a few soft blobs and sensor noise."""
    t = np.linspace(0, 1, size)[None, :, None]
    angle = rng.uniform(0, np.pi)
    ramp = np.cos(angle) * t + np.sin(angle) * t.transpose(1, 0, 2)
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = a + (b - a) * ramp / max(ramp.max(), 1e-6)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        x, y, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(5, 20))]
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.integers(0, 256, 3).tolist()))
    image = image.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(20):
        photo(rng).save(root / f"train-{i:02d}.png")
    held = tmp_path_factory.mktemp("held-out")
    for i in range(4):
        photo(rng).save(held / f"{i}.png")
    return root, held


@pytest.fixture(scope="module")
def tiny_ae(images, tmp_path_factory):
    """The shipped `tiny-ae` matrix through the command line, the last 4 of 20 images held out."""
    root, _ = images
    out = tmp_path_factory.mktemp("ablation")
    code = main(["ablate", "--matrix", "tiny-ae", "--data", str(root), "--out", str(out), "--eval-images", "4", *STEPS])
    return out, code


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def cell_metrics(out, cell):
    return json.loads((out / cell / "metrics.json").read_text())


def test_autoencoder_matrix_on_real_images_tabulates_reconstruction(tiny_ae, images):
    out, code = tiny_ae
    assert code == 0
    table = read_csv(out / "results.csv")
    # an autoencoder-only matrix: no tokens per step, no AR training time, no generation scores
    assert list(table[0]) == ["cell", "status", "psnr", "ssim", "ae_train_s", "wall_s", "overrides", "error"]
    assert [r["cell"] for r in table] == ["stage1-only", "sigma-0.1", "sigma-0.5"]
    for row in table:
        assert row["status"] == "ok" and row["error"] == "", row
        assert 3 < float(row["psnr"]) < 60 and -1 <= float(row["ssim"]) <= 1
    scores = {c: cell_metrics(out, c)["evaluations"]["reconstruction"] for c in ("stage1-only", "sigma-0.1", "sigma-0.5")}
    assert all(s["n_images"] == 4 and s["skipped"] == 0 for s in scores.values())  # the 4 held-out images
    # the cells differ, and so do their scores: stage 2 trained on, with different latent noise
    assert scores["stage1-only"]["psnr"] != scores["sigma-0.1"]["psnr"] != scores["sigma-0.5"]["psnr"]
    assert scores["stage1-only"]["ssim"] != scores["sigma-0.1"]["ssim"]
    assert float(table[0]["psnr"]) == pytest.approx(scores["stage1-only"]["psnr"], abs=1e-4)
    # one stage 1 shared by all three cells, two stage 2s, three scores; nothing of a generator
    shared = {p.name.split("-")[0] for p in (out / "shared").iterdir()}
    assert shared == {"ae1", "ae2", "eval"}
    assert len(list((out / "shared").glob("ae1-*"))) == 1 and len(list((out / "shared").glob("ae2-*"))) == 2
    assert all((out / c / "preset.json").exists() for c in scores)
    md = (out / "results.md").read_text()
    assert "# Ablation `tiny-ae`" in md and "`tiny-internvl3`" in md and str(images[0]) in md
    assert "| cell | status | PSNR | SSIM |" in md and "held out of training" in md
    assert Image.open(out / "results.png").size[0] >= 500


def test_rerun_skips_finished_cells(tiny_ae, images, monkeypatch, capsys):
    out, _ = tiny_ae
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    assert len(stamps) == 3

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("vgt_core.ablation.train_autoencoder", no_training)
    monkeypatch.setattr("vgt_core.evaluators.ReconstructionEvaluator.evaluate", no_training)
    code = main(["ablate", "--matrix", "tiny-ae", "--data", str(images[0]), "--out", str(out), "--eval-images", "4", *STEPS])
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == stamps
    assert "stage1-only" in capsys.readouterr().out


class LatentStatsOptions(Options):
    what: str = "std"


class LatentStats:
    """A plugin's own evaluator: the spread of the autoencoder's latents on the held-out images."""

    needs = "autoencoder"
    columns = {"latent_std": "latent std"}
    plots = ("latent_std",)

    def __init__(self, options):
        self.options = options

    def evaluate(self, context):
        import torch

        from vgt_core.autoencoder import VGTAutoencoder
        from vgt_core.data import collate, open_dataset

        ae = VGTAutoencoder.from_pretrained(context.autoencoder)
        batch = collate([open_dataset(context.held_out, ae.image_size)[i] for i in range(len(context.held_out))])
        with torch.no_grad():
            latents = ae.encode(batch["images"])
        return {"latent_std": float(latents.std()), "images": len(context.held_out)}


class NotAnEvaluator:
    def __init__(self, options):
        pass


class LatentStatsPlugin:
    @hookimpl
    def vgt_register_evaluators(self, register):
        register("latent-stats", LatentStats, LatentStatsOptions, "latent spread")
        register("broken", NotAnEvaluator)


@pytest.fixture
def latent_stats_plugin():
    name = register_plugin(LatentStatsPlugin(), name="test-latent-stats")
    yield
    unregister_plugin(name)


def write_registry(path, matrices):
    path.write_text(yaml.safe_dump({"matrices": matrices}))
    return str(path)


def test_own_evaluator_plugin_and_separate_held_out_folder(images, latent_stats_plugin, tmp_path):
    """A registered evaluator beside reconstruction, on a held-out folder; cells that share an autoencoder score the
    same, cells that differ score differently."""
    root, held = images
    vit = {"name": "vit", "options": {"latent_channels": 32, "width": 32, "depth": 1, "heads": 2, "patch_size": 16}}
    registry = write_registry(tmp_path / "extra.yaml", {"mine": {
        "base": "tiny-internvl3", "description": "decoders, and a generation-only change",
        "evaluators": [{"name": "reconstruction"}, {"name": "latent-stats"}],
        "cells": {"dcae": {"train_ae.stage2": None}, "dcae-m4": {"train_ae.stage2": None, "generation.tokens_per_step": 4},
                  "vit": {"train_ae.stage2": None, "decoder": vit}},
    }})
    rows = run_ablation("mine", tmp_path / "out", data=root, eval_data=held, steps=2, progress=False, registry=[registry], overrides=FAST)
    assert [r["status"] for r in rows] == ["ok"] * 3, [r.get("error") for r in rows]
    by = {r["cell"]: r for r in rows}
    assert by["dcae"]["psnr"] == by["dcae-m4"]["psnr"] and by["dcae"]["latent_std"] == by["dcae-m4"]["latent_std"]
    assert by["dcae"]["psnr"] != by["vit"]["psnr"] and by["dcae"]["ssim"] != by["vit"]["ssim"]
    assert all(r["latent_std"] > 0 for r in rows)
    table = read_csv(tmp_path / "out" / "results.csv")
    assert list(table[0])[2:5] == ["psnr", "ssim", "latent_std"]
    assert len(list((tmp_path / "out" / "shared").glob("ae1-*"))) == 2  # dcae-m4 reused dcae's autoencoder
    metrics = cell_metrics(tmp_path / "out", "dcae")
    assert metrics["evaluations"]["latent-stats"]["images"] == 4 and metrics["evaluations"]["reconstruction"]["n_images"] == 4
    assert "latent std" in (tmp_path / "out" / "results.md").read_text()

    broken = write_registry(tmp_path / "broken.yaml", {"b": {"base": "tiny-internvl3", "evaluators": [{"name": "broken"}], "cells": {"a": {}}}})
    with pytest.raises(ConfigError, match="evaluator 'broken' .plugin 'test-latent-stats'. .* lacks"):
        run_ablation("b", tmp_path / "b", data=root, registry=[broken])


def test_bad_matrices_and_data_say_what_is_wrong(images, tmp_path):
    root, _ = images
    registry = write_registry(tmp_path / "bad.yaml", {
        "typo": {"base": "tiny-internvl3", "evaluators": [{"name": "reconstructoin"}], "cells": {"a": {}}},
        "badopt": {"base": "tiny-internvl3", "evaluators": [{"name": "reconstruction", "options": {"imgs": 3}}], "cells": {"a": {}}},
        "metric": {"base": "tiny-internvl3", "metrics": ["geneval_overall"], "cells": {"a": {}}},
    })
    with pytest.raises(ConfigError, match="unknown evaluator 'reconstructoin'.*reconstruction"):
        run_ablation("typo", tmp_path / "o", data=root, registry=[registry])
    with pytest.raises(ConfigError, match="evaluators\\[0\\].options.imgs"):
        run_ablation("badopt", tmp_path / "o", data=root, registry=[registry])
    with pytest.raises(ConfigError, match="unknown metric 'geneval_overall'"):
        run_ablation("metric", tmp_path / "o", data=root, registry=[registry])
    with pytest.raises(ConfigError, match="has no `dataset`: pass --data"):
        run_ablation("tiny-ae", tmp_path / "o")
    with pytest.raises(ConfigError, match="the training data has 20 items: holding out 20 .* leaves none to train on"):
        run_ablation("tiny-ae", tmp_path / "o", data=root, budget=Budget(eval_images=20))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        run_ablation("tiny-ae", tmp_path / "o", data=root, eval_data=tmp_path / "missing")
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_a_generator_evaluator_needs_a_backbone(images, tmp_path):
    """shapes-geneval on a matrix whose cells have no language model: each cell fails and says why."""
    root, _ = images
    registry = write_registry(tmp_path / "gen.yaml", {"g": {
        "base": "tiny-internvl3", "evaluators": [{"name": "shapes-geneval"}],
        "cells": {"no-lm": {"backbone": None, "train_ae.stage2": None}},
    }})
    rows = run_ablation("g", tmp_path / "out", data=root, steps=1, progress=False, registry=[registry], budget=Budget(eval_images=4),
                        overrides=FAST)
    assert rows[0]["status"] == "failed" and "score a generator, but the cell's preset has no backbone" in rows[0]["error"]
    assert math.isfinite(rows[0]["wall_s"]) and not (tmp_path / "out" / "shared").exists()  # refused before training


def test_a_folder_of_other_files_is_refused_and_left_alone(images, tmp_path, capsys):
    """--out must be new, empty or an earlier ablation's: a folder of someone's files is one error line, untouched."""
    root, _ = images
    (tmp_path / "notes.txt").write_text("mine")
    code = main(["ablate", "--matrix", "tiny-ae", "--data", str(root), "--out", str(tmp_path), "--eval-images", "4", *STEPS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("vgt ablate: error:") and "is not empty" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
