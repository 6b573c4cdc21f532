"""The mini-GenEval scorer: detection, GenEval's rules, agreement with the renderer, robustness, folders."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vgt_shapes.scorer import MAX_STRAY, Detection, detect, evaluate, relations, score_folder, score_image, stray_ink
from vgt_shapes.world import COLORS, SHAPES, ShapeObject, ShapesWorld, draw, prompt_space, write_geneval_folder

ALL_PROMPTS = ShapesWorld().evaluation_prompts()


def degrade(image: Image.Image, radius: float, noise: float, seed: int = 0) -> Image.Image:
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), np.float64)
    noisy = blurred + np.random.default_rng(seed).normal(0, noise, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def box(x0: int, y0: int, x1: int, y1: int, shape: str = "circle", color: str = "red") -> Detection:
    return Detection(shape, color, (x0, y0, x1, y1), (x1 - x0) * (y1 - y0), ((x0 + x1) / 2, (y0 + y1) / 2))


def test_detect_finds_shape_colour_and_box_of_each_object():
    for shape in SHAPES:
        for color in COLORS:
            objects = [ShapeObject(shape, color, 0.25, 0.5, 0.25), ShapeObject("square", "blue", 0.6, 0.1, 0.3)]
            found = detect(draw(objects, 64))
            assert [(d.shape, d.color) for d in found if d.bbox[1] > 20] == [(shape, color)]
            target = next(d for d in found if d.bbox[1] > 20)
            assert np.abs(np.subtract(target.bbox, (16, 32, 32, 48))).max() <= 1  # a triangle's apex row may be empty
    square = detect(draw([ShapeObject("square", "green", 0.5, 0.25, 0.25)], 64))
    assert square == [Detection("square", "green", (32, 16, 48, 32), 256, (40.0, 24.0))]


def test_detect_accepts_arrays_and_ignores_debris():
    image = draw([ShapeObject("triangle", "purple", 0.2, 0.2, 0.4)], 64)
    expected = detect(image)
    assert len(expected) == 1
    assert detect(np.asarray(image)) == expected and detect(np.asarray(image) / 255.0) == expected
    debris = np.full((64, 64, 3), 255, np.uint8)
    debris[30, 2:62] = COLORS["red"]  # a line
    debris[5:25, 5:25] = COLORS["blue"]
    debris[6:24, 6:24] = 255  # a ring
    debris[50, 50] = COLORS["green"]  # a speck
    noise = np.random.default_rng(0).normal(0, 10, debris.shape)
    debris = np.clip(np.where(debris == 255, 255 + noise, debris), 0, 255).astype(np.uint8)  # noisy background
    assert detect(debris) == []


def noise_images(size: int, seed: int) -> dict[str, Image.Image]:
    rng = np.random.default_rng(seed)
    fields = {f"colour field {g}x{g}": rng.integers(0, 256, (g, g, 3), dtype=np.uint8) for g in (4, 8)}
    images = {name: Image.fromarray(f).resize((size, size), Image.BILINEAR) for name, f in fields.items()}
    images["pixel noise"] = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return images


@pytest.mark.parametrize("size", [32, 64])
def test_noise_never_passes_as_a_scene(size):
    """A generator that outputs noise scores 0 on every task, the lenient single_object included."""
    for seed in range(20):
        for name, image in noise_images(size, seed).items():
            assert stray_ink(image) > MAX_STRAY, (name, seed)
            for metadata in ALL_PROMPTS[::5]:
                assert not score_image(image, metadata), (name, seed, metadata["prompt"])


def test_detect_is_fast_on_large_images():
    image = ShapesWorld(448, tasks=["counting"]).sample(2).image
    start = time.perf_counter()
    found = detect(degrade(image, 4, 8))
    assert time.perf_counter() - start < 2.0
    assert len(found) >= 2


def test_relations_follow_genevals_margin_rule():
    left, right = box(0, 10, 10, 20), box(20, 12, 30, 22)
    assert relations(left, right) == {"left of"} and relations(right, left) == {"right of"}
    top, bottom = box(10, 0, 20, 10), box(11, 30, 21, 40)
    assert relations(top, bottom) == {"above"} and relations(bottom, top) == {"below"}
    assert relations(box(0, 0, 10, 10), box(30, 30, 40, 40)) == {"left of", "above"}
    assert relations(box(0, 0, 10, 10), box(1, 1, 11, 11)) == set()  # within the margin: no relation


def test_evaluate_applies_genevals_rules():
    red_circle = {"include": [{"class": "circle", "count": 1, "color": "red"}]}
    small_red, big_blue = box(0, 0, 10, 10, color="red"), box(20, 20, 40, 40, color="blue")
    assert evaluate([small_red], red_circle)[0]
    assert not evaluate([small_red, big_blue], red_circle)[0]  # the largest circle is the one judged
    two = {"include": [{"class": "circle", "count": 2}], "exclude": [{"class": "circle", "count": 3}]}
    assert evaluate([small_red, big_blue], two)[0]
    correct, reasons = evaluate([small_red, big_blue, box(50, 0, 60, 10)], two)
    assert not correct and reasons == ["expected circle<3, found 3"]
    position = {"include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    square_right = box(30, 0, 40, 10, shape="square")
    assert evaluate([small_red, square_right], position)[0]
    assert not evaluate([small_red], position)[0]  # the reference failed, so the position fails too
    assert not evaluate([box(50, 0, 60, 10), square_right], position)[0]


@pytest.mark.parametrize("size", [48, 64, 128])
def test_ground_truth_images_score_correct(size):
    world = ShapesWorld(size)
    seeds = range(3) if size < 128 else range(1)
    for metadata in ALL_PROMPTS:
        for seed in seeds:
            correct, reasons = evaluate(detect(world.render(metadata, seed)), metadata)
            assert correct, (size, seed, metadata["prompt"], reasons)


@pytest.mark.parametrize("size", [32, 64])
def test_training_samples_score_correct_against_their_metadata(size):
    world = ShapesWorld(size, seed=11)
    for i in range(150):
        sample = world.sample(i)
        assert score_image(sample.image, sample.metadata), (i, sample.caption)


@pytest.mark.parametrize("size, radius, noise", [(32, 0.5, 8.0), (64, 1.0, 8.0), (128, 2.0, 8.0), (64, 1.5, 12.0)])
def test_blurred_noisy_ground_truth_still_scores_correct(size, radius, noise):
    world = ShapesWorld(size)
    for index, metadata in enumerate(ALL_PROMPTS):
        image = degrade(world.render(metadata, index), radius, noise, seed=index)
        assert score_image(image, metadata), (metadata["prompt"], evaluate(detect(image), metadata)[1])


def corrupted(world: ShapesWorld, metadata: dict, change, seed: int = 0) -> tuple[bool, list[str]]:
    objects = change(world.layout(metadata, seed))
    return evaluate(detect(draw(objects, world.image_size)), metadata)


def test_wrong_colour_scores_zero():
    world = ShapesWorld(64)
    prompts = prompt_space("colors") + prompt_space("color_attr")[::7]
    for index, metadata in enumerate(prompts):
        def recolour(objects):
            first = objects[index % len(objects)]
            other = next(c for c in COLORS if c != first.color)
            return [dataclasses.replace(first, color=other)] + [o for o in objects if o is not first]

        correct, reasons = corrupted(world, metadata, recolour, seed=index)
        assert not correct and "expected" in reasons[0] and any(c in reasons[0] for c in COLORS), metadata["prompt"]


def test_wrong_count_scores_zero():
    world = ShapesWorld(64)
    for metadata in prompt_space("counting") + prompt_space("two_object"):
        correct, reasons = corrupted(world, metadata, lambda objects: objects[1:])
        assert not correct and "found" in reasons[0]
    for metadata in prompt_space("counting"):
        count = metadata["include"][0]["count"]
        if count < 4:
            more = dict(metadata, include=[dict(metadata["include"][0], count=count + 1)])
            correct, reasons = evaluate(detect(world.render(more, 3)), metadata)
            assert not correct and reasons == [f"expected {metadata['include'][0]['class']}<{count + 1}, found {count + 1}"]


def test_wrong_side_scores_zero():
    world = ShapesWorld(64)
    for index, metadata in enumerate(prompt_space("position")):
        relation = metadata["include"][1]["position"][0]
        image = world.render(metadata, index)
        assert score_image(image, metadata)
        if relation in ("left of", "right of"):
            mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            correct, reasons = evaluate(detect(mirrored), metadata)
            assert not correct and reasons == [f"expected {metadata['include'][1]['class']} {relation} target"]

        def mirror(objects):  # upright shapes, mirrored positions (a pixel flip would turn triangles over)
            if relation in ("left of", "right of"):
                return [dataclasses.replace(o, x=1 - o.x - o.size) for o in objects]
            return [dataclasses.replace(o, y=1 - o.y - o.size) for o in objects]

        correct, reasons = corrupted(world, metadata, mirror, seed=index)
        assert not correct and reasons == [f"expected {metadata['include'][1]['class']} {relation} target"]


def test_wrong_shape_scores_zero():
    world = ShapesWorld(64)
    for metadata in prompt_space("single_object") + prompt_space("colors"):
        for other in SHAPES:
            if other != metadata["include"][0]["class"]:
                correct, reasons = corrupted(world, metadata, lambda objs: [dataclasses.replace(o, shape=other) for o in objs])
                assert not correct and reasons == [f"expected {metadata['include'][0]['class']}>=1, found 0"]


def test_score_folder_reads_geneval_layout_and_counts_unreadable_images(tmp_path):
    world = ShapesWorld(48)
    circle = prompt_space("single_object")[0]
    red_square = next(m for m in prompt_space("colors") if m["prompt"] == "a photo of a red square")
    wrong = world.render(prompt_space("single_object")[1], 0)  # a square for the circle prompt
    items = [
        (circle, [world.render(circle, 0), world.render(circle, 1), world.render(circle, 2), wrong]),
        (red_square, [world.render(red_square, 0), world.render(red_square, 1)]),
    ]
    root = write_geneval_folder(tmp_path, items)
    (root / "00001" / "samples" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "00001" / "samples" / "0002.png").write_bytes((root / "00001" / "samples" / "0000.png").read_bytes()[:60])
    (root / "notes").mkdir()  # not a prompt folder
    (root / "00002").mkdir()  # no metadata
    summary = score_folder(root)
    assert summary["per_task"] == {"colors": pytest.approx(1 / 3), "single_object": pytest.approx(3 / 4)}
    assert summary["overall"] == pytest.approx((1 / 3 + 3 / 4) / 2)  # mean of tasks, not of images
    assert summary["images"] == 7 and summary["correct"] == 4 and summary["unreadable"] == 2
    assert summary["bad_metadata"] == ["00002"]
    assert [(p["folder"], p["correct"], p["total"], p["unreadable"]) for p in summary["per_prompt"]] == [
        ("00000", 3, 4, 0),
        ("00001", 1, 3, 2),
    ]
    assert score_folder(tmp_path / "00002")["overall"] == 0.0
