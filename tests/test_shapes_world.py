"""The shapes world: captions and metadata in GenEval's format, determinism, layout, held-out prompts."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from vgt_shapes import ShapesDataset, ShapesOptions
from vgt_shapes.world import (
    BACKGROUND,
    COLORS,
    HELD_OUT_TASKS,
    SHAPES,
    TASKS,
    ShapesWorld,
    draw,
    prompt_space,
    write_geneval_folder,
)


def test_prompt_spaces_have_geneval_captions_and_metadata():
    sizes = {task: len(prompt_space(task)) for task in TASKS}
    assert sizes == {"single_object": 3, "two_object": 6, "counting": 9, "colors": 18, "position": 24, "color_attr": 180}
    by_prompt = {m["prompt"]: m for task in TASKS for m in prompt_space(task)}
    assert by_prompt["a photo of a circle"] == {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    assert by_prompt["a photo of a circle and a square"]["include"] == [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]
    assert by_prompt["a photo of three triangles"]["include"] == [{"class": "triangle", "count": 3}]
    assert by_prompt["a photo of three triangles"]["exclude"] == [{"class": "triangle", "count": 4}]
    assert by_prompt["a photo of an orange circle"]["include"] == [{"class": "circle", "count": 1, "color": "orange"}]
    # GenEval: the reference object first, the positioned one second, pointing at entry 0
    assert by_prompt["a photo of a circle left of a square"]["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["left of", 0]},
    ]
    assert by_prompt["a photo of a red circle and a blue square"]["include"] == [
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "square", "count": 1, "color": "blue"},
    ]
    assert list(by_prompt["a photo of two squares"]) == ["tag", "include", "exclude", "prompt"]  # GenEval's key order
    assert len(by_prompt) == sum(sizes.values())  # no caption names two different prompts


def test_sample_is_a_pure_function_of_seed_and_index():
    world = ShapesWorld(48, seed=3)
    forward = [world.sample(i) for i in range(12)]
    again = ShapesWorld(48, seed=3)
    for i in reversed(range(12)):  # random access order does not matter
        sample = again.sample(i)
        assert sample.caption == forward[i].caption and sample.metadata == forward[i].metadata
        assert sample.image.tobytes() == forward[i].image.tobytes()
    other = [ShapesWorld(48, seed=4).sample(i) for i in range(12)]
    assert sum(a.image.tobytes() != b.image.tobytes() for a, b in zip(forward, other)) >= 10


def test_tasks_cycle_with_the_index_and_layouts_do_not_depend_on_resolution():
    small, large = ShapesWorld(32, seed=1), ShapesWorld(128, seed=1)
    tags = [small.sample(i).metadata["tag"] for i in range(2 * len(TASKS))]
    assert tags == list(TASKS) * 2
    for i in range(6):
        assert small.sample(i).objects == large.sample(i).objects
        assert large.sample(i).image.size == (128, 128)
    chosen = ShapesWorld(32, tasks=["colors", "position"])
    assert [chosen.sample(i).metadata["tag"] for i in range(4)] == ["colors", "position"] * 2


def test_images_are_flat_white_and_palette_with_separate_large_enough_objects():
    world = ShapesWorld(64, tasks=["counting"])
    palette = {BACKGROUND, *COLORS.values()}
    for i in range(40):
        sample = world.sample(i)
        pixels = np.asarray(sample.image)
        assert {tuple(p) for p in pixels.reshape(-1, 3)} <= palette  # no anti-aliasing
        assert len(sample.objects) == sample.metadata["include"][0]["count"]
        masks = [np.asarray(draw([obj], 64)).min(2) < 255 for obj in sample.objects]
        assert all(mask.sum() > 0 for mask in masks)
        assert sum(masks).max() == 1  # no two objects share a pixel
        for obj in sample.objects:
            assert obj.size * 64 >= 12 and 0 <= obj.x and obj.x + obj.size <= 1 and 0 <= obj.y and obj.y + obj.size <= 1
    assert any(len(world.sample(i).objects) == 4 for i in range(40))


def test_render_satisfies_metadata_layout():
    world = ShapesWorld(64)
    metadata = prompt_space("color_attr")[0]
    objects = world.layout(metadata, 5)
    assert sorted((o.shape, o.color) for o in objects) == sorted((e["class"], e["color"]) for e in metadata["include"])
    assert world.render(metadata, 5).tobytes() == draw(objects, 64).tobytes()
    above = next(m for m in prompt_space("position") if m["include"][1]["position"][0] == "above")
    moved, reference = world.layout(above, 0)
    assert moved.shape == above["include"][1]["class"] and moved.y + moved.size < reference.y
    with pytest.raises(ValueError, match="1 to 4 objects"):
        world.layout({"include": [{"class": "circle", "count": 5}]})


def test_held_out_prompts_are_never_training_captions():
    world = ShapesWorld(32)
    held = [m for m in world.evaluation_prompts() if m["tag"] in HELD_OUT_TASKS]
    assert Counter(m["tag"] for m in held) == {"two_object": 3, "position": 8, "color_attr": 48}
    assert all(world.is_held_out(m["prompt"]) for m in held)
    assert world.is_held_out("  " + held[0]["prompt"].upper()) and not world.is_held_out("a photo of a circle")
    for task in HELD_OUT_TASKS:
        training = {m["prompt"] for m in world.training_prompts(task)}
        evaluation = {m["prompt"] for m in held if m["tag"] == task}
        assert training.isdisjoint(evaluation) and training | evaluation == {m["prompt"] for m in prompt_space(task)}
    captions = {world.sample(i).caption for i in range(600)}
    assert not any(world.is_held_out(c) for c in captions)
    assert len(captions) > 100
    # each word order of each pair, and every colour on every shape in both slots, remains in training
    two = {tuple(e["class"] for e in m["include"]) for m in world.training_prompts("two_object")}
    assert {frozenset(p) for p in two} == {frozenset(p) for p in [("circle", "square"), ("circle", "triangle"), ("square", "triangle")]}
    bindings = Counter((slot, e["class"], e["color"]) for m in world.training_prompts("color_attr") for slot, e in enumerate(m["include"]))
    assert len(bindings) == 2 * len(SHAPES) * len(COLORS)


def test_evaluation_prompts_are_fixed_and_independent_of_the_sampling_seed():
    world = ShapesWorld(64, seed=0)
    prompts = world.evaluation_prompts()
    assert prompts == ShapesWorld(128, seed=9).evaluation_prompts()
    assert Counter(m["tag"] for m in prompts) == {
        "single_object": 3, "two_object": 3, "counting": 9, "colors": 18, "position": 8, "color_attr": 48
    }
    assert ShapesWorld(64, holdout_seed=7).evaluation_prompts() != prompts  # the split is the holdout seed's
    few = world.evaluation_prompts(per_task=4, seed=1)
    assert Counter(m["tag"] for m in few) == {t: min(4, n) for t, n in Counter(m["tag"] for m in prompts).items()}
    assert all(m in prompts for m in few) and few == world.evaluation_prompts(per_task=4, seed=1)
    assert few != world.evaluation_prompts(per_task=4, seed=2)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="four objects must fit"):
        ShapesWorld(64, max_object_frac=0.5)
    with pytest.raises(ValueError, match="unknown tasks"):
        ShapesWorld(64, tasks=["counting", "spatial"])
    with pytest.raises(IndexError):
        ShapesWorld(64).sample(-1)


def test_dataset_options_set_the_object_sizes_of_every_world_they_make():
    options = ShapesOptions(image_size=32, size=40, min_object_frac=0.3, max_object_frac=0.4)
    for world in (ShapesDataset(options).world, options.world(seed=7)):
        sizes = [o.size for i in range(40) for o in world.sample(i).objects]
        assert 0.3 <= min(sizes) and max(sizes) <= 0.4
    assert options.world(seed=7).seed == 7 and options.world().seed == options.seed
    default = [o.size for i in range(40) for o in ShapesDataset(ShapesOptions(image_size=32, size=40)).world.sample(i).objects]
    assert min(default) < 0.3  # the world's own range (0.2-0.36) when the options do not say


def test_bad_object_sizes_name_the_key():
    with pytest.raises(ValidationError, match="max_object_frac"):
        ShapesOptions(min_object_frac=0.35, max_object_frac=0.3)
    with pytest.raises(ValidationError, match="max_object_frac"):
        ShapesOptions(max_object_frac=0.5)  # four objects would not fit


def test_write_geneval_folder_layout(tmp_path):
    world = ShapesWorld(32)
    prompts = world.evaluation_prompts(per_task=1)
    items = [(m, [world.render(m, seed) for seed in range(2)]) for m in prompts]
    root = write_geneval_folder(tmp_path / "out", items)
    assert sorted(p.name for p in root.iterdir()) == [f"{i:05d}" for i in range(len(prompts))]
    for i, metadata in enumerate(prompts):
        folder = root / f"{i:05d}"
        assert sorted(p.name for p in folder.iterdir()) == ["metadata.jsonl", "samples"]
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        text = (folder / "metadata.jsonl").read_text()
        assert text.count("\n") == 1 and json.loads(text) == metadata
        with Image.open(folder / "samples" / "0001.png") as image:
            assert image.size == (32, 32) and image.convert("RGB").tobytes() == items[i][1][1].tobytes()
