"""Bad input, damaged files and runs that must not "succeed" (issue #12, items 3-10): each test fails without
its fix."""

from __future__ import annotations

from vgt_core.serialization import RUN_KIND, prepare_output

import io
import json
import os
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vgt_core.cli import main
from vgt_core.config import ConfigError, GenerationConfig, load_presets
from vgt_core.errors import VGTError
from vgt_shapes.world import ShapesWorld

TINY = "tiny-internvl3"
AR_RUN = {
    "train_ar.batch_size": 4, "train_ar.log_every": 1, "train_ar.sample_count": 0, "train_ar.checkpoint_every": 1,
    "train_ar.keep_checkpoints": 5, "train_ar.warmup_steps": 1,
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Eight captioned images, two different tiny VGT-AE folders, a latent cache of the first, a pipeline folder."""
    from vgt_core.compose import build
    from vgt_core.data import open_dataset
    from vgt_core.latents import cache_latents
    from vgt_core.pipeline import VGTPipeline

    root = tmp_path_factory.mktemp("bad-input")
    (root / "images").mkdir()
    world = ShapesWorld(image_size=64, seed=3)
    for i in range(8):
        sample = world.sample(i)
        sample.image.save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text(sample.caption)
    torch.manual_seed(0)
    ae, gen = build(TINY)
    ae.save_pretrained(root / "ae")
    torch.manual_seed(1)
    build(TINY)[0].save_pretrained(root / "ae-other")
    cache_latents(ae, open_dataset(root / "images", ae.image_size), root / "cache", progress=False, source=root / "ae")
    VGTPipeline(ae, gen, GenerationConfig(num_sampling_steps=2, guidance_scale=2.0, tokens_per_step=4)).save_pretrained(root / "pipe")
    return root


def tiny_preset(**overrides):
    return load_presets().preset(TINY, {**AR_RUN, **overrides})


# -- item 3: 16-bit PNGs -------------------------------------------------------------------------------------------


def test_a_16_bit_png_reads_as_its_8_bit_twin(tmp_path):
    from vgt_core.data import transform_image

    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # the same picture in 16 bits
    sixteen = Image.open(tmp_path / "sixteen.png")
    assert sixteen.mode.startswith("I")  # what made convert("RGB") saturate
    a = transform_image(Image.open(tmp_path / "eight.png"), 32)
    b = transform_image(sixteen, 32)
    assert (a - b).abs().max() <= 2 / 255 + 1e-6  # within one 8-bit level ([-1, 1] range)
    # and a 16-bit mid-grey is grey, not white
    Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)).save(tmp_path / "grey.png")
    assert abs(float(transform_image(Image.open(tmp_path / "grey.png"), 32).mean())) < 0.01


# -- item 4: runs that trained nothing -----------------------------------------------------------------------------


def test_zero_or_negative_steps_are_refused(models, tmp_path, capsys):
    from vgt_core.training.autoregressive import train_generator

    for steps in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_:
            main(["train-ar", "--preset", TINY, "--autoencoder", str(models / "ae"), "--out", str(tmp_path / "x"), "--steps", steps])
        assert exit_.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err
    with pytest.raises(VGTError, match="steps must be at least 1"):
        train_generator(tiny_preset(), models / "ae", tmp_path / "y", data=models / "cache", steps=0, progress=False)
    assert not (tmp_path / "y" / "model").exists()


def test_a_data_set_without_a_readable_image_stops_before_training(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for i in range(4):
        (tmp_path / "data" / f"{i}.png").write_bytes(b"not an image")
    code = main(["train-ae", "--preset", TINY, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--set", "train_ae.stage1.batch_size=2", "--quiet"])  # fmt: skip
    assert code == 2 and "none of the data set's 4 images is readable" in capsys.readouterr().err
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(models, tmp_path, monkeypatch):
    from vgt_core.generator import VGTGenerator
    from vgt_core.training.autoregressive import train_generator
    from vgt_core.training.run import log_file

    original, calls = VGTGenerator.forward, []

    def forward(self, *args, **kwargs):  # the loss of the third step is NaN (as an LR of 1e6 makes it)
        calls.append(1)
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(VGTGenerator, "forward", forward)
    with pytest.raises(VGTError, match=r"step 3: the loss is not finite .*step-00000002"):
        train_generator(tiny_preset(), models / "ae", tmp_path / "run", data=models / "cache", steps=5, progress=False)
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").glob("step-*"))] == ["step-00000001", "step-00000002"]
    assert not (tmp_path / "run" / "model").exists()  # nothing exported
    assert [row["step"] for row in log_file(tmp_path / "run")] == [1, 2]


def test_a_latent_cache_of_another_autoencoder_is_refused(models, tmp_path):
    from vgt_core.latents import check_cache_source
    from vgt_core.training.autoregressive import train_generator

    manifest = json.loads((models / "cache" / "manifest.json").read_text())
    assert len(manifest["autoencoder_sha256"]) == 64
    with pytest.raises(ValueError, match="the latents were made by .* not by --autoencoder"):
        train_generator(tiny_preset(), models / "ae-other", tmp_path / "run", data=models / "cache", steps=2, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    check_cache_source(manifest, models / "ae", models / "cache")  # its own autoencoder passes
    del manifest["autoencoder_sha256"]
    with pytest.warns(UserWarning, match="does not record which autoencoder"):
        check_cache_source(manifest, models / "ae-other", models / "cache")


# -- item 5: settings validated up front ---------------------------------------------------------------------------


def test_generation_settings_are_validated_with_the_preset():
    with pytest.raises(ConfigError, match="tokens_per_step"):
        load_presets().preset(TINY, {"generation.tokens_per_step": 0})
    with pytest.raises(ConfigError, match="sample_generation"):
        load_presets().preset(TINY, {"train_ar.sample_generation": {"tokens_per_step": 0}})
    with pytest.raises(ValueError):
        GenerationConfig(seed=2**64)


def test_group_sizes_that_do_not_divide_the_grid_fail_before_the_first_step(models, tmp_path):
    from vgt_core.training.autoregressive import train_generator

    preset = tiny_preset(**{"sampler.options.train_group_sizes": [1, 3]})
    with pytest.raises(ValueError, match=r"sampler.options.train_group_sizes \[1, 3\]: \[3\] do not divide the 16 tokens"):
        train_generator(preset, models / "ae", tmp_path / "run", data=models / "cache", steps=2, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_batch_larger_than_the_data_set_names_its_key(models, tmp_path):
    from vgt_core.data import check_trainable, open_dataset
    from vgt_core.training.autoregressive import train_generator

    with pytest.raises(ValueError, match=r"fewer than one batch of 16.*--set train_ar.batch_size=8"):
        train_generator(tiny_preset(**{"train_ar.batch_size": 16}), models / "ae", tmp_path / "run", data=models / "cache", progress=False)
    with pytest.raises(ValueError, match=r"--set train_ae.stage2.batch_size=8"):
        check_trainable(open_dataset(models / "images", 64), 9, "train_ae.stage2.batch_size")


def test_a_seed_beyond_64_bits_is_a_usage_error(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", str(models / "pipe"), "--prompt", "a", "--out", str(tmp_path / "a.png"), "--seed", str(2**64)])
    assert exit_.value.code == 2 and "expected an integer in [0, 2**64)" in capsys.readouterr().err


def test_invalid_generation_json_names_the_file(models, tmp_path):
    import shutil

    from vgt_core.pipeline import VGTPipeline

    shutil.copytree(models / "pipe", tmp_path / "pipe")
    (tmp_path / "pipe" / "generation.json").write_text(json.dumps({"tokens_per_step": 0}))
    with pytest.raises(ConfigError, match=r"generation.json: tokens_per_step"):
        VGTPipeline.from_pretrained(tmp_path / "pipe")


# -- item 6: every error is one line, exit 2 -----------------------------------------------------------------------


def one_line_error(capsys, argv: list[str], command: str, needle: str) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"vgt {command}: error:"), err
    assert needle in lines[0], err


def test_every_class_of_bad_input_ends_as_one_error_line(models, tmp_path, capsys):
    import shutil

    (tmp_path / "bad.jsonl").write_text("not json\n")
    one_line_error(capsys, ["train-ae", "--preset", TINY, "--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "r")],
                   "train-ae", "line 1")  # fmt: skip
    gen = ["generate", "--prompt", "a red circle", "--quiet"]
    one_line_error(capsys, [*gen, "--model", str(models / "pipe"), "--out", str(tmp_path / "a.png"), "--guidance-scale", "-1"],
                   "generate", "guidance_scale")  # fmt: skip
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, [*gen, "--model", str(models / "pipe"), "--out", str(tmp_path / "file")], "generate", "file")

    broken = {}
    for damage in ("shape", "config", "weights"):
        broken[damage] = tmp_path / damage
        shutil.copytree(models / "pipe", broken[damage])
    config = json.loads((broken["shape"] / "generator" / "config.json").read_text())
    config["options"]["head_width"] = 32
    (broken["shape"] / "generator" / "config.json").write_text(json.dumps(config))
    (broken["config"] / "generator" / "config.json").write_text('{"format": "vgt-gen')
    weights = broken["weights"] / "generator" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for damage, needle in (("shape", "weights do not match"), ("config", "damaged JSON"), ("weights", "damaged safetensors")):
        one_line_error(capsys, [*gen, "--model", str(broken[damage]), "--out", str(tmp_path / "b.png")], "generate", needle)

    with pytest.raises(VGTError, match="weights do not match"):  # --debug: the exception itself, with its traceback
        main(["--debug", *gen, "--model", str(broken["shape"]), "--out", str(tmp_path / "b.png")])
    os.environ["VGT_DEBUG"] = "1"
    try:
        with pytest.raises(VGTError, match="damaged JSON"):
            main([*gen, "--model", str(broken["config"]), "--out", str(tmp_path / "b.png")])
    finally:
        del os.environ["VGT_DEBUG"]


def test_a_folder_that_is_not_a_model_is_named_as_such(models, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "meta.jsonl").write_text('{"prompt": "a red circle"}\n')
    notes = str(tmp_path / "notes")
    one_line_error(capsys, ["generate", "--model", notes, "--prompt", "x", "--out", str(tmp_path / "a.png")], "generate",
                   "not a vgt pipeline folder")  # fmt: skip
    one_line_error(capsys, ["bench-geneval", "--model", notes, "--metadata", str(tmp_path / "meta.jsonl"), "--out", str(tmp_path / "g")],
                   "bench-geneval", "not a vgt pipeline folder")  # fmt: skip
    one_line_error(capsys, ["eval-recon", "--model", notes, "--data", notes], "eval-recon", "not a VGT autoencoder folder (no config.json")
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "results.jsonl").write_text('{"tag": "colors"\n')
    one_line_error(capsys, ["bench-summary", str(tmp_path / "scores")], "bench-summary", "results.jsonl: line 1 is not JSON")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p1.txt").write_bytes(b"\xff\xfe\x00bad")
    one_line_error(capsys, ["bench-dpg", "--model", notes, "--prompts", str(tmp_path / "prompts"), "--out", str(tmp_path / "d")],
                   "bench-dpg", "p1.txt: not UTF-8 text")  # fmt: skip


def test_an_unknown_plugin_in_vgt_load_plugins_is_one_error_line():
    env = {**os.environ, "VGT_LOAD_PLUGINS": "dcea"}
    done = subprocess.run([sys.executable, "-m", "vgt_core.cli", "plugins"], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("vgt plugins: error: VGT_LOAD_PLUGINS: unknown plugin 'dcea'"), done.stderr


# -- item 7: damaged inputs ----------------------------------------------------------------------------------------


def _shard(count: int) -> tuple[bytes, list[tarfile.TarInfo]]:
    world, buf = ShapesWorld(image_size=32, seed=1), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(count):
            png = io.BytesIO()
            world.sample(i).image.save(png, format="PNG")
            for name, data in ((f"{i:03d}.png", png.getvalue()), (f"{i:03d}.txt", b"caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data, tar.getmembers()


@pytest.mark.parametrize("where", ["inside the last image", "inside the last header", "inside the last caption"])
def test_a_truncated_tar_shard_loses_only_its_damaged_samples(tmp_path, where):
    from vgt_core.data import TarShardDataset

    data, members = _shard(4)
    image, caption = members[-2], members[-1]
    cut = {"inside the last image": image.offset_data + image.size // 2, "inside the last header": image.offset + 100,
           "inside the last caption": caption.offset_data + 2}[where]  # fmt: skip
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    with pytest.warns(UserWarning, match="truncated tar shard"):
        shard = TarShardDataset([tmp_path / "cut.tar"])
    kept = 4 if where == "inside the last caption" else 3
    assert len(shard) == kept and shard.damaged == 4 - kept
    assert all(shard[i]["image"] is not None for i in range(kept))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (tmp_path / "whole.tar").write_bytes(data)
        assert len(TarShardDataset([tmp_path / "whole.tar"])) == 4  # an intact shard: no warning


def _run(out, preset=None, resume=True):
    from vgt_core.training.run import TrainingRun

    return TrainingRun(out, precision="no", resume=resume, progress=False, preset=preset)


def test_a_half_written_log_line_does_not_block_resume(tmp_path):
    out = tmp_path / "run"
    prepare_output(out, RUN_KIND).release()  # an earlier run's folder
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    run = _run(out)
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    run._truncate_log(2)  # what load_latest does when it resumes from step 2
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_new_run_drops_a_dead_runs_log_and_temporary_folders(tmp_path):
    out = tmp_path / "run"
    prepare_output(out, RUN_KIND).release()  # an earlier run's folder
    for leftover in (out / ".tmp-model-1234abcd", out / "checkpoints" / ".tmp-step-00000002", out / "user" / ".tmp-mine"):
        leftover.mkdir(parents=True)
        (leftover / "f").write_text("x")
    (out / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # killed before its first checkpoint
    _run(out, resume=False)
    assert not (out / ".tmp-model-1234abcd").exists() and not (out / "checkpoints" / ".tmp-step-00000002").exists()
    assert (out / "user" / ".tmp-mine" / "f").exists()  # not a folder vgt writes its temporaries into
    assert (out / "log.jsonl").read_text() == ""


def test_resume_names_what_changed_in_the_preset(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    old = tiny_preset().model_dump(mode="json")
    (out / "preset.json").write_text(json.dumps(old))
    changed = tiny_preset(**{"train_ar.lr": 0.5, "generation.guidance_scale": 7.0}).model_dump(mode="json")
    with pytest.raises(VGTError, match=r"changed: train_ar.lr \(0.001 -> 0.5\), generation.guidance_scale"):
        _run(out, changed)
    _run(out, tiny_preset(**{"train_ar.steps": 900}).model_dump(mode="json"))
    assert "--resume with changed steps: train_ar.steps 200 -> 900" in capsys.readouterr().out


# -- item 8: generation --------------------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_language_models_positions_is_cut_with_a_warning(models):
    from vgt_core.pipeline import VGTPipeline

    pipe = VGTPipeline.from_pretrained(models / "pipe")
    pipe.generator.options = pipe.generator.options.model_copy(update={"max_prompt_tokens": None})
    positions = pipe.generator.backbone.lm.config.max_position_embeddings
    seen = []
    original = pipe.generator.backbone.embed_prompts
    pipe.generator.backbone.embed_prompts = lambda texts, max_tokens=None: seen.append(original(texts, max_tokens)[1]) or original(texts, max_tokens)
    with pytest.warns(UserWarning, match="was cut to its first"):
        pipe(["word " * positions], progress=False, output_type="pt", seed=0)
    assert seen[0].shape[1] + 2 * 16 <= positions  # prompt + image-start + 2 slots per latent token fit


def test_several_prompts_with_a_png_out_write_numbered_files(models, tmp_path):
    code = main(["generate", "--model", str(models / "pipe"), "--prompt", "a", "--prompt", "b", "--seed", "3",
                 "--out", str(tmp_path / "x.png"), "--quiet"])  # fmt: skip
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png"]


def test_a_seed_gives_a_prompt_the_same_image_alone_and_in_any_batch(models):
    from vgt_core.pipeline import VGTPipeline

    pipe = VGTPipeline.from_pretrained(models / "pipe")
    prompts = ["a red circle", "a photo of two blue squares left of a green triangle", "a cat"]  # padding differs
    for settings in ({"solver": "euler"}, {"solver": "sde", "order": "random"}):
        batch = pipe(prompts, batch_size=3, seed=11, output_type="pt", progress=False, **settings)
        ones = pipe(prompts, batch_size=1, seed=11, output_type="pt", progress=False, **settings)
        torch.testing.assert_close(batch, ones, atol=1e-4, rtol=0)
        alone = pipe(prompts[2:], seed=13, output_type="pt", progress=False, **settings)  # image i: seed + i
        torch.testing.assert_close(batch[2:], alone, atol=1e-4, rtol=0)
        assert not torch.allclose(batch[0], batch[1], atol=1e-2)


# -- item 9: stage-2 defaults --------------------------------------------------------------------------------------


def test_every_shipped_stage_2_normalises_and_adds_noise():
    book = load_presets()
    stage2 = {name: book.preset(name).train_ae.stage2 for name in book.names()}
    checked = {name: s for name, s in stage2.items() if s is not None}
    assert {"tiny-internvl3", "tiny-qwen25vl", "tiny-mismatched", "shapes-demo"} <= set(checked)
    for name, s in checked.items():
        assert s.latent_norm != "none" and s.noise_sigma > 0 and s.distill_weight < 1, name


def test_a_stage_2_override_starts_from_the_stage_2_recipe():
    book = load_presets()
    name = next(n for n in book.names() if "stage2" not in book.raw(n).get("train_ae", {}) and book.preset(n).train_ae.stage2)
    s = book.preset(name, {"train_ae.stage2.batch_size": 1}).train_ae.stage2
    assert (s.batch_size, s.latent_norm, s.noise_sigma, s.distill_weight, s.lr) == (1, "layernorm", 0.1, 0.1, 1e-4)


# -- item 10: --set numbers ----------------------------------------------------------------------------------------


def test_set_reads_1e_minus_6_as_a_number_inside_a_model_config():
    from vgt_core.cli import _overrides
    from vgt_core.compose import build_autoencoder

    overrides = _overrides(["encoder.options.config.text_config.rms_norm_eps=1e-6", "description='1e-6'"])
    assert overrides == {"encoder.options.config.text_config.rms_norm_eps": 1e-6, "description": "1e-6"}
    preset = load_presets().preset(TINY, overrides)
    ae = build_autoencoder(preset)  # a string here broke the build: rms_norm_eps expected float
    assert ae is not None


def test_a_tokens_per_step_schedule_that_misses_the_grid_fails_before_training(models, tmp_path):
    from vgt_core.training.autoregressive import train_generator

    preset = tiny_preset(**{"generation.tokens_per_step": [4, 4]})
    with pytest.raises(ValueError, match=r"generation.tokens_per_step: tokens_per_step schedule \[4, 4\] must .* add up to 16"):
        train_generator(preset, models / "ae", tmp_path / "run", data=models / "cache", steps=2, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
