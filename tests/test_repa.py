"""REPA's teacher: a frozen (tiny) timm DINOv3 ViT loaded without unpickling, its features on the latent grid, and
the REPA loss it drives through a tiny VGTGenerator."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import builtin_preset
from vgt_core.config import ARTraining, GeneratorOptions, Preset
from vgt_core.errors import ConfigError
from vgt_core.generator import VGTGenerator
from vgt_core.repa import RepaTeacher, build_repa_teacher, check_repa, repa_targets

ARCH = "vit_base_patch16_dinov3"  # the real DINOv3 class (CLS + 4 registers, RoPE, dynamic sizes), shrunk
TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)


def reference_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, num_classes=0, **TINY).eval()


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in reference_model().state_dict().items()}, str(path))
    return path


def teacher_from(path: Path, **kw) -> RepaTeacher:
    torch.manual_seed(123)  # a different random init: only the file can make it equal the reference
    return RepaTeacher(ARCH, weights=path, image_size=32, **TINY, **kw)


def test_safetensors_weights_load_exactly_and_the_teacher_stays_frozen(weights):
    ref, teacher = reference_model(), teacher_from(weights)
    for (name, a), (_, b) in zip(ref.state_dict().items(), teacher.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert teacher.feature_dim == 32 and teacher.model.num_prefix_tokens == 5  # CLS + 4 registers
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training


def test_features_are_the_patch_tokens_in_raster_order_without_cls_and_registers(weights):
    """On a latent grid equal to the patch grid, feature k is exactly the model's k-th patch token."""
    ref, teacher = reference_model(), teacher_from(weights)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    cfg = timm.data.resolve_model_data_config(ref)
    x = ((images + 1) / 2 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = ref.forward_features(x)  # (B, 5 + 16, D)
    assert tokens.shape[1] == 5 + 16
    torch.testing.assert_close(teacher(images, (4, 4)), tokens[:, 5:])


def test_features_are_resized_bilinearly_to_the_latent_grid_from_any_image_size(weights):
    ref, teacher = reference_model(), teacher_from(weights)
    images = torch.rand(2, 3, 48, 48) * 2 - 1  # resized to the teacher's 32 px
    cfg = timm.data.resolve_model_data_config(ref)
    assert cfg["interpolation"] == "bicubic"
    x = F.interpolate((images + 1) / 2, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        patches = ref.forward_features(x)[:, 5:].transpose(1, 2).reshape(2, 32, 4, 4)
    expected = F.interpolate(patches, size=(3, 5), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    out = repa_targets(teacher, images, (3, 5))
    assert out.shape == (2, 15, 32) and not out.requires_grad
    torch.testing.assert_close(out, expected)


def test_non_square_images_keep_their_aspect_on_a_patch_multiple(weights):
    teacher = teacher_from(weights)
    assert teacher.input_size(48, 48) == (32, 32)
    assert teacher.input_size(32, 64) == (32, 64)  # DINOv3 takes dynamic sizes: nothing is cropped away
    images = torch.rand(1, 3, 32, 64) * 2 - 1
    assert teacher.patch_features(images).shape == (1, 32, 4, 8)


def test_a_pth_of_plain_tensors_loads_weights_only(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save({"model": reference_model().state_dict()}, path)
    teacher = teacher_from(path)
    assert all(torch.equal(a, b) for a, b in zip(reference_model().state_dict().values(), teacher.model.state_dict().values()))


def test_a_pickle_that_runs_code_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("evil.pth", "evil.bin"):
        path = tmp_path / name
        torch.save({"blocks.0.norm1.weight": Payload()}, path)
        with pytest.raises(ConfigError, match="refused"):
            teacher_from(path)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        teacher_from(tmp_path / "evil.pkl")
    assert not marker.exists()
    torch.load(tmp_path / "evil.pth", weights_only=False)  # the planted file is live: unpickling it would have run
    assert marker.exists()


def test_weights_missing_keys_are_named(tmp_path):
    state = {k: v.contiguous() for k, v in reference_model().state_dict().items() if k != "reg_token"}
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ConfigError, match="missing keys: reg_token"):
        teacher_from(tmp_path / "partial.safetensors")
    with pytest.raises(ConfigError, match="no such file"):
        teacher_from(tmp_path / "absent.safetensors")


def test_unknown_model_names_list_close_timm_names():
    with pytest.raises(ConfigError, match=r"unknown timm model 'vit_base_patch16_dinov4\.lvd1689m'.*vit_base_patch16_dinov3\.lvd1689m"):
        RepaTeacher("vit_base_patch16_dinov4.lvd1689m")


def test_the_generator_width_must_match_the_teacher(weights):
    teacher = teacher_from(weights)
    check_repa(GeneratorOptions(repa_dim=32), teacher)
    with pytest.raises(ConfigError, match=r"generator\.repa_dim is 768 .* 32-dim"):
        check_repa(GeneratorOptions(repa_dim=768), teacher)
    with pytest.raises(ConfigError, match=r"set generator\.repa_dim to 32"):
        check_repa(GeneratorOptions(), teacher)
    training = ARTraining(repa_weight=0.5, repa_model=ARCH, repa_weights=str(weights), repa_image_size=32, repa_model_kwargs=TINY)
    assert build_repa_teacher(training, GeneratorOptions(repa_dim=32)).feature_dim == 32
    assert build_repa_teacher(ARTraining(), GeneratorOptions()) is None  # weight 0: no teacher, nothing loaded
    preset = builtin_preset("tiny-internvl3")
    preset["train_ar"]["repa_weight"] = 0.5
    with pytest.raises(ValueError, match=r"repa_weight > 0 needs generator\.repa_dim"):
        Preset.model_validate(preset)
    preset["generator"]["repa_dim"] = 32
    Preset.model_validate(preset)


def test_repa_loss_trains_the_generator_and_not_the_teacher(weights):
    teacher = teacher_from(weights)
    p = builtin_preset("tiny-internvl3")
    torch.manual_seed(0)
    gen = VGTGenerator.from_specs(p["backbone"], p["sampler"], options={**p["generator"], "repa_dim": 32, "repa_projector_dim": 32})
    check_repa(gen.options, teacher)
    torch.manual_seed(1)
    for block in gen.head.blocks:  # past its zero init, the head's adaLN passes gradients on to the LM
        torch.nn.init.normal_(block.modulation[-1].weight, std=0.05)
    images, latents = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 32, 4, 4)
    captions = ["a red circle", "two blue squares"]
    targets = repa_targets(teacher, images, tuple(latents.shape[-2:]))

    _, repa = gen(latents, captions, repa_features=targets)
    repa.backward()
    assert gen.head.repa_projector[0].weight.grad.abs().sum() > 0
    assert gen.head.input_proj.weight.grad.abs().sum() > 0  # the head's blocks up to the tap
    assert gen.head.blocks[0].modulation[-1].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.backbone.parameters())  # and the LM trunk
    assert gen.head.final.weight.grad is None or gen.head.final.weight.grad.abs().sum() == 0
    assert all(p.grad is None for p in teacher.parameters())

    opt = torch.optim.AdamW(gen.head.repa_projector.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        _, repa = gen(latents, captions, repa_features=targets)
        losses.append(repa.item())
        opt.zero_grad()
        repa.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.3, losses  # -cos falls from about 0 towards -1


def test_train_ar_trains_the_projector_with_repa_and_freezes_it_without(weights, tmp_path):
    """`vgt train-ar` with repa_weight > 0: the teacher reads the images, the log holds both losses and the
    projector learns; at repa_weight 0 the same projector stays as initialised."""
    from safetensors.torch import load_file

    from conftest import builtin_preset
    from vgt_core.compose import build_autoencoder
    from vgt_core.config import check_preset
    from vgt_core.training.autoregressive import train_generator
    from vgt_core.training.run import log_file
    from vgt_shapes.world import ShapesWorld

    world = ShapesWorld(image_size=64, seed=2)
    for i in range(4):
        sample = world.sample(i)
        sample.image.save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(sample.caption)
    p = builtin_preset("tiny-internvl3")
    p["generator"].update(repa_dim=32)
    p["train_ar"].update(batch_size=2, log_every=1, sample_every=1000, repa_model=ARCH, repa_weights=str(weights),
                         repa_model_kwargs=TINY, repa_image_size=32)  # fmt: skip
    build_autoencoder(check_preset(p, "test", "tiny")).save_pretrained(tmp_path / "ae")
    projector = {}
    for weight in (0.5, 0.0):
        p["train_ar"]["repa_weight"] = weight
        out = train_generator(check_preset(p, "test", "tiny"), tmp_path / "ae", tmp_path / f"run-{weight}", data=tmp_path, steps=4, progress=False)
        state = load_file(str(out / "generator" / "model.safetensors"))
        projector[weight] = {k: v for k, v in state.items() if "repa_projector" in k}
    rows = log_file(tmp_path / "run-0.5")
    assert all({"flow", "repa"} <= r.keys() for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["flow"] + 0.5 * rows[0]["repa"], rel=1e-5)
    assert "repa" not in log_file(tmp_path / "run-0.0")[0]
    assert projector[0.5] and all(not torch.equal(projector[0.5][k], projector[0.0][k]) for k in projector[0.0] if k.endswith("weight"))
