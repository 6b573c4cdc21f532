"""`vgt ablate` on the shapes world: a matrix of registry.yaml runs cell by cell into one complete table, resumes,
survives a failure; the world's VLM pre-training and mini-GenEval plug into the core's runner."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from PIL import Image

from vgt_core.cli import main
from vgt_core.config import load_presets
from vgt_core.errors import ConfigError
from vgt_core.ablation import Budget, run_ablation
from vgt_shapes.world import TASKS

TINY = Budget(latent_images=64, eval_images=16)
TINY_FLAGS = ["--latent-images", "64", "--eval-images", "16"]
COLUMNS = ["cell", "status", "tokens_per_step", "psnr", "ssim", "geneval_overall", *(f"geneval_{t}" for t in TASKS),
           "gen_s_per_image", "ae_train_s", "ar_train_s", "wall_s", "overrides", "error"]
# The world's steps, budgets trimmed to the test's size (the steps are capped by --steps).
SHAPES = {"prepare": {"name": "shapes-understanding", "options": {"eval_images": 32}},
          "evaluators": [{"name": "reconstruction"},
                         {"name": "shapes-geneval", "options": {"samples_per_prompt": 1, "prompts_per_task": 1}}]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two matrices on shapes-demo: two cells that share every artefact but generation, and one failing cell."""
    path = tmp_path_factory.mktemp("registry") / "ablations.yaml"
    path.write_text(yaml.safe_dump({"matrices": {
        "two": {"description": "tokens per step", "base": "shapes-demo", **SHAPES,
                "axes": {"generation.tokens_per_step": [1, 4]}},
        "mixed": {"description": "one cell fails at generation", "base": "shapes-demo", **SHAPES,
                  "cells": {"bad-schedule": {"generation.tokens_per_step": [3, 3]}, "m16": {"generation.tokens_per_step": 16}}},
        "not-shapes": {"base": "tiny-internvl3", **SHAPES, "cells": {"a": {}}},
    }}))
    return str(path)


@pytest.fixture(scope="module")
def two(registry, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    rows = run_ablation("two", out, steps=2, quick=True, progress=False, registry=[registry], budget=TINY)
    return out, rows


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_cell_matrix_writes_a_complete_table(two):
    out, rows = two
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("error") for r in rows]
    table = read_csv(out / "results.csv")
    assert list(table[0]) == COLUMNS
    assert [r["cell"] for r in table] == ["tokens_per_step=1", "tokens_per_step=4"]
    for row in table:
        assert all(row[c] != "" for c in COLUMNS if c != "error"), row
        assert row["error"] == "" and row["status"] == "ok"
        assert 0 <= float(row["geneval_overall"]) <= 1 and float(row["psnr"]) > 0
    assert [r["tokens_per_step"] for r in table] == ["1", "4"]
    # the two cells differ only in generation: they share the autoencoder, the latents and the generator
    metrics = [json.loads((out / r["cell"] / "metrics.json").read_text()) for r in table]
    assert metrics[0]["artifacts"] == metrics[1]["artifacts"]
    assert metrics[0]["evaluations"]["reconstruction"] == metrics[1]["evaluations"]["reconstruction"]
    assert metrics[0]["evaluations"]["reconstruction"]["n_images"] == 16  # the held-out images
    assert len(list((out / "shared").glob("ar-*"))) == 1 and len(list((out / "shared").glob("vlm-*"))) == 1
    # every cell's encoder and backbone were the pre-trained VLM's
    vlm = next((out / "shared").glob("vlm-*"))
    preset = json.loads((out / "tokens_per_step=1" / "preset.json").read_text())
    assert preset["encoder"]["options"]["pretrained"] == preset["backbone"]["options"]["pretrained"] == str(vlm)
    # the generator was trained with the capped number of steps
    assert json.loads((out / metrics[0]["artifacts"]["generator"] / ".." / "preset.json").read_text())["train_ar"]["steps"] == 2
    for r in table:
        assert len([p for p in (out / r["cell"] / "shapes-geneval").iterdir() if p.name.isdigit()]) == 6  # one prompt per task

    md = (out / "results.md").read_text()
    assert "# Ablation `two`" in md and "`shapes-demo`" in md and "tokens per step" in md
    assert "`tokens_per_step=1`" in md and "`tokens_per_step=4`" in md and "GenEval" in md
    assert "understanding VLM, pre-trained 2 steps" in md
    assert Image.open(out / "results.png").size[0] > 500


def test_rerun_skips_finished_cells(two, registry, monkeypatch):
    out, rows = two
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")}
    assert len(stamps) == 2

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr("vgt_core.pipeline.VGTPipeline.from_pretrained", no_training)
    monkeypatch.setattr("vgt_core.ablation.train_autoencoder", no_training)
    monkeypatch.setattr("vgt_shapes.understanding.pretrain_understanding", no_training)
    again = run_ablation("two", out, steps=2, quick=True, progress=False, registry=[registry], budget=TINY)
    assert again == rows
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.json")} == stamps


def test_failing_cell_is_recorded_and_the_others_still_run(two, registry, capsys):
    out, _ = two  # the same folder: the new cells reuse the shared VLM, autoencoder and generator
    code = main(["ablate", "--matrix", "mixed", "--out", str(out), "--steps", "2", "--quick", "--quiet", "--registry", registry, *TINY_FLAGS])
    assert code == 1  # the run went on, then reported the failure
    table = {r["cell"]: r for r in read_csv(out / "results.csv")}
    assert table["bad-schedule"]["status"] == "failed"
    assert "add up to 16" in table["bad-schedule"]["error"]  # the 4x4 latent
    assert "add up to 16" in (out / "bad-schedule" / "error.txt").read_text()
    assert not (out / "bad-schedule" / "metrics.json").exists()  # so the next run tries it again
    assert table["m16"]["status"] == "ok" and table["m16"]["geneval_overall"] != ""
    assert "Failed cells" in (out / "results.md").read_text()
    assert "bad-schedule" in capsys.readouterr().out
    for kind in ("vlm", "ae1", "ae2", "latents", "ar"):
        assert len(list((out / "shared").glob(f"{kind}-*"))) == 1, kind


def test_the_shapes_preparation_refuses_a_base_preset_of_another_world(registry, tmp_path):
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(tmp_path / f"{i}.png")
    with pytest.raises(ConfigError, match=r"shapes-understanding \(matrices.not-shapes\) works on the shapes world: .* not None"):
        run_ablation("not-shapes", tmp_path / "out", data=tmp_path, progress=False, registry=[registry], budget=Budget(eval_images=1))
    assert not list((tmp_path / "out").glob("*/metrics.json"))


def test_unknown_matrix_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown matrix 'sampler'; known: samplers"):
        run_ablation("sampler", tmp_path)


SHIPPED = {
    "decoders": {"dcae": None, "sdvae": "sdvae", "vit": "vit"},
    "ae-training": {"stage1-only": None, "stage2-no-noise": 0.0, "sigma-0.1": 0.1, "sigma-0.3": 0.3, "sigma-0.5": 0.5},
    "pairing": {"matched": "internvl3", "mismatched": "qwen25vl", "pixel-vae": "dcae-encoder"},
    "samplers": {"queryar-1x": ("queryar", 1, [1]), "queryar-4x": ("queryar", 4, [1]), "mar-1x": ("mar", 1, None),
                 "mar-4x": ("mar", 4, None), "queryar-grouped-4x": ("queryar", 4, [4]), "queryar-grouped-16x": ("queryar", 16, [16])},
}


def test_shipped_matrices_expand_to_the_paper_cells_and_validate():
    book = load_presets()
    book.check_all()
    for name, expected in SHIPPED.items():
        matrix = book.matrix(name)
        assert matrix.base == "shapes-demo" and matrix.description
        assert matrix.prepare.name == "shapes-understanding"
        assert [e.name for e in matrix.evaluators] == ["reconstruction", "shapes-geneval"]
        cells = matrix.expand()
        assert list(cells) == list(expected)
        presets = {label: book.preset(matrix.base, overrides) for label, overrides in cells.items()}
        for label, want in expected.items():
            p = presets[label]
            if name == "decoders":
                assert p.decoder.name == (want or "dcae")
            elif name == "ae-training":
                if want is None:
                    assert p.train_ae.stage2 is None
                else:
                    assert p.train_ae.stage2.noise_sigma == want and p.train_ae.stage2.latent_norm == "layernorm"
            elif name == "pairing":
                assert p.encoder.name == want and p.backbone.name == "internvl3-lm"
            else:
                sampler, m, groups = want
                assert (p.sampler.name, p.generation.tokens_per_step) == (sampler, m)
                assert p.sampler.options.get("train_group_sizes") == groups
    pixel = book.preset("shapes-demo", book.matrix("pairing").cells["pixel-vae"])
    assert pixel.train_ae.stage1.distill_weight == 0 and pixel.train_ae.stage2.distill_weight == 0


def test_every_shipped_cell_builds_an_autoencoder_with_the_base_latent():
    """A long ablation must not fail on a cell whose architecture does not fit: 4x4x32 latents at 32 px."""
    import torch

    from vgt_core.compose import build_autoencoder

    book = load_presets()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    for name in SHIPPED:
        matrix = book.matrix(name)
        for label, overrides in matrix.expand().items():
            out = build_autoencoder(book.preset(matrix.base, overrides))(images)
            assert out["latents"].shape == (2, 32, 4, 4), (name, label)
            assert out["reconstruction"].shape == images.shape, (name, label)


def test_a_preset_without_stage_2_says_so_when_asked_for_it(tmp_path):
    """`train_ae.stage2: null` (the stage-1-only cell) is a valid preset whose stage-1 model is final."""
    from vgt_core.training.autoencoder import train_autoencoder

    preset = load_presets().preset("shapes-demo", {"train_ae.stage2": None})
    assert preset.train_ae.stage2 is None
    with pytest.raises(ValueError, match="no stage 2 .train_ae.stage2 is null"):
        train_autoencoder(preset, tmp_path / "s2", stage=2, init=tmp_path / "s1")
