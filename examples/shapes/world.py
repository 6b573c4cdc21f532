"""The shapes world: a tiny synthetic text-to-image world with GenEval's tasks, small enough to train on a CPU.

Images hold 1-4 flat, non-overlapping objects (circle, square, upward triangle) in six exact colours on white.
Captions and metadata follow GenEval ("a photo of ...", ``{"tag", "include", "exclude"?, "prompt"}``):

* ``single_object`` "a photo of a circle" - the colour is random and not named.
* ``two_object`` "a photo of a circle and a square" - two different shapes, random colours.
* ``counting`` "a photo of three triangles" - n in 2..4 of one shape. As in GenEval the colour is never named
  (each object's colour is random); ``exclude`` carries count n + 1.
* ``colors`` "a photo of a red circle".
* ``position`` "a photo of a circle left of a square" - the first object is placed relative to the second;
  as in GenEval no colours are named, and ``include`` lists the reference first and the positioned object
  second with ``"position": [relation, 0]``.
* ``color_attr`` "a photo of a red circle and a blue square" - two different shapes in two different colours.

Held-out rule: for the combinatorial tasks (two_object, position, color_attr) a fixed subset of the prompt
space, drawn from ``holdout_seed`` alone (never from the sampling seed), is kept for evaluation and never
used as a training caption: one word order of each shape pair (two_object), 2 of the 6 shape pairs of each
relation (position), and 8 of the 30 colour pairs of each shape pair (color_attr). single_object (3 prompts),
colors (18) and counting (9) are evaluated on their whole prompt space, which training also uses: they cannot
be held out without removing words from training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 200),
    "orange": (240, 130, 30),
}
BACKGROUND = (255, 255, 255)
RELATIONS = ("left of", "right of", "above", "below")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HELD_OUT_TASKS = ("two_object", "position", "color_attr")
HOLDOUT_SEED = 2024
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4

# Layout constants, as fractions of the image side.
MARGIN = 0.03  # free border
GAP = 0.06  # free space between two objects' boxes, so blurred objects never merge into one
POSITION_GAP = 0.08  # larger gap along a relation's axis keeps the relation unambiguous
POSITION_JITTER = 0.04  # misalignment across a relation's axis
MAX_OBJECT_FRAC = (1 - 2 * MARGIN) / 2 - GAP  # largest size for which four objects always fit (2x2 grid)
OBJECT_FRAC = (0.2, 0.36)  # the default range of object sizes


@dataclass(frozen=True)
class ShapeObject:
    """One object; ``x, y`` (box top-left) and ``size`` (box side) are fractions of the image side, so one
    layout renders the same scene at every resolution."""

    shape: str
    color: str
    x: float
    y: float
    size: float


@dataclass
class ShapesSample:
    """One training example; ``objects`` is the layout behind ``image`` (for tests and debugging)."""

    image: Image.Image
    caption: str
    metadata: dict
    objects: list[ShapeObject] = field(default_factory=list)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _entry(shape: str, count: int = 1, color: str | None = None, position: tuple[str, int] | None = None) -> dict:
    entry: dict = {"class": shape, "count": count}
    if color is not None:
        entry["color"] = color
    if position is not None:
        entry["position"] = list(position)
    return entry


def _metadata(tag: str, prompt: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    metadata: dict = {"tag": tag, "include": include}
    if exclude:
        metadata["exclude"] = exclude
    metadata["prompt"] = prompt
    return metadata


def prompt_space(task: str) -> list[dict]:
    """Every prompt (as GenEval metadata) of one task, in a fixed order."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if task == "single_object":
        return [_metadata(task, f"a photo of {_article(s)}", [_entry(s)]) for s in SHAPES]
    if task == "two_object":
        return [_metadata(task, f"a photo of {_article(a)} and {_article(b)}", [_entry(a), _entry(b)]) for a, b in pairs]
    if task == "counting":
        return [
            _metadata(task, f"a photo of {NUMBER_WORDS[n]} {s}s", [_entry(s, n)], [_entry(s, n + 1)])
            for s in SHAPES
            for n in NUMBER_WORDS
        ]
    if task == "colors":
        return [_metadata(task, f"a photo of {_article(f'{c} {s}')}", [_entry(s, color=c)]) for s in SHAPES for c in COLORS]
    if task == "position":
        return [
            _metadata(task, f"a photo of {_article(a)} {rel} {_article(b)}", [_entry(b), _entry(a, position=(rel, 0))])
            for rel in RELATIONS
            for a, b in pairs
        ]
    if task == "color_attr":
        return [
            _metadata(
                task,
                f"a photo of {_article(f'{ca} {a}')} and {_article(f'{cb} {b}')}",
                [_entry(a, color=ca), _entry(b, color=cb)],
            )
            for a, b in pairs
            for ca in COLORS
            for cb in COLORS
            if ca != cb
        ]
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# task -> (how prompts are grouped, how many of each group are held out); grouping keeps every word of
# every slot in training.
_HOLDOUT_RULES: dict[str, tuple[Callable[[dict], object], int]] = {
    "two_object": (lambda m: frozenset(e["class"] for e in m["include"]), 1),
    "position": (lambda m: m["include"][1]["position"][0], 2),
    "color_attr": (lambda m: tuple(e["class"] for e in m["include"]), 8),
}


def held_out_prompts(task: str, holdout_seed: int = HOLDOUT_SEED) -> list[dict]:
    """The evaluation-only prompts of a combinatorial task (empty for the others), a function of the seed."""
    if task not in _HOLDOUT_RULES:
        prompt_space(task)  # validates the name
        return []
    key, per_group = _HOLDOUT_RULES[task]
    groups: dict[object, list[dict]] = {}
    for metadata in prompt_space(task):
        groups.setdefault(key(metadata), []).append(metadata)
    rng = np.random.default_rng([holdout_seed, TASKS.index(task)])
    held = []
    for members in groups.values():
        held += [members[i] for i in sorted(rng.choice(len(members), per_group, replace=False))]
    return held


def _normalise(caption: str) -> str:
    return " ".join(caption.lower().split())


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _shape_mask(shape: str, side: int) -> np.ndarray:
    centres = np.arange(side) + 0.5
    u, v = np.meshgrid(centres, centres)  # u across, v down, in pixels from the box's corner
    if shape == "square":
        return np.ones((side, side), bool)
    if shape == "circle":
        return (u - side / 2) ** 2 + (v - side / 2) ** 2 <= (side / 2) ** 2
    if shape == "triangle":  # apex at the top centre, base along the bottom: half-width grows as v / 2
        return np.abs(u - side / 2) <= v / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw(objects: Iterable[ShapeObject], image_size: int) -> Image.Image:
    """Rasterise a layout without anti-aliasing: every pixel is white or exactly one palette colour."""
    canvas = np.full((image_size, image_size, 3), BACKGROUND, np.uint8)
    for obj in objects:
        x0, y0 = round(obj.x * image_size), round(obj.y * image_size)
        side = max(1, round((obj.x + obj.size) * image_size) - x0)
        mask = _shape_mask(obj.shape, side)[: image_size - y0, : image_size - x0]
        canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = COLORS[obj.color]
    return Image.fromarray(canvas)


def _apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    return ax + asz + GAP <= bx or bx + bsz + GAP <= ax or ay + asz + GAP <= by or by + bsz + GAP <= ay


class ShapesWorld:
    """A seeded, lazily indexable stream of (image, caption, metadata) samples plus its evaluation prompts.

    Sample ``i`` is a pure function of ``(seed, i)`` and the settings; tasks cycle with the index, so every
    run of ``len(tasks)`` consecutive indices is an equal mix. Train and evaluation worlds agree on the
    held-out prompts as long as they share ``holdout_seed`` (the default).
    """

    def __init__(
        self,
        image_size: int = 64,
        seed: int = 0,
        tasks: Sequence[str] | None = None,
        min_object_frac: float = OBJECT_FRAC[0],
        max_object_frac: float = OBJECT_FRAC[1],
        holdout_seed: int = HOLDOUT_SEED,
    ) -> None:
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        if not 0 < min_object_frac <= max_object_frac <= MAX_OBJECT_FRAC:
            raise ValueError(
                f"need 0 < min_object_frac <= max_object_frac <= {MAX_OBJECT_FRAC:.2f} (four objects must fit), "
                f"got {min_object_frac}, {max_object_frac}"
            )
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.tasks = tuple(tasks) if tasks else TASKS
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; expected some of {TASKS}")
        self.image_size, self.seed, self.holdout_seed = image_size, seed, holdout_seed
        self.min_object_frac, self.max_object_frac = min_object_frac, max_object_frac
        self._held_out = {task: held_out_prompts(task, holdout_seed) for task in TASKS}
        self._held_out_captions = {_normalise(m["prompt"]) for ms in self._held_out.values() for m in ms}
        self._training = {
            task: [m for m in prompt_space(task) if not self.is_held_out(m["prompt"])] for task in self.tasks
        }

    def is_held_out(self, caption: str) -> bool:
        """Whether a caption is one of the evaluation-only prompts (case and spacing ignored)."""
        return _normalise(caption) in self._held_out_captions

    def training_prompts(self, task: str) -> list[dict]:
        """The prompts training samples of ``task`` are drawn from: its prompt space minus the held-out ones."""
        return copy.deepcopy(self._training[task])

    def evaluation_prompts(self, per_task: int | None = None, seed: int = 0) -> list[dict]:
        """Fixed evaluation metadata for every task of this world: the held-out prompts of the combinatorial
        tasks and the whole prompt space of the others; ``per_task`` keeps at most that many per task
        (a subset chosen by ``seed``, in canonical order)."""
        prompts = []
        for index, task in enumerate(self.tasks):
            pool = self._held_out[task] or prompt_space(task)
            if per_task is not None and per_task < len(pool):
                keep = np.random.default_rng([seed, index]).choice(len(pool), per_task, replace=False)
                pool = [pool[i] for i in sorted(keep)]
            prompts += copy.deepcopy(pool)
        return prompts

    def sample(self, index: int) -> ShapesSample:
        """Training sample ``index``: a training prompt of task ``tasks[index % len(tasks)]`` and its image."""
        if index < 0:
            raise IndexError(f"index must be non-negative, got {index}")
        rng = np.random.default_rng([self.seed, index])
        pool = self._training[self.tasks[index % len(self.tasks)]]
        metadata = copy.deepcopy(pool[rng.integers(len(pool))])
        objects = self.layout(metadata, rng)
        return ShapesSample(draw(objects, self.image_size), metadata["prompt"], metadata, objects)

    def render(self, metadata: dict, rng: np.random.Generator | int = 0) -> Image.Image:
        """An image that satisfies ``metadata`` (e.g. a ground-truth image for an evaluation prompt)."""
        return draw(self.layout(metadata, rng), self.image_size)

    def layout(self, metadata: dict, rng: np.random.Generator | int = 0) -> list[ShapeObject]:
        """Objects satisfying GenEval metadata: exactly ``count`` of each included class, its colour if named
        (else a random one), and the relation if one is asked for."""
        rng = _as_rng(rng)
        include = metadata["include"]
        if any("position" in entry for entry in include):
            return self._relational_layout(include, rng)
        wanted = [(e["class"], e.get("color")) for e in include for _ in range(e["count"])]
        if not 1 <= len(wanted) <= MAX_OBJECTS:
            raise ValueError(f"can draw 1 to {MAX_OBJECTS} objects, metadata asks for {len(wanted)}")
        boxes = self._scatter(len(wanted), rng)
        return [ShapeObject(shape, color or self._random_color(rng), *box) for (shape, color), box in zip(wanted, boxes)]

    def _random_color(self, rng: np.random.Generator) -> str:
        return list(COLORS)[rng.integers(len(COLORS))]

    def _scatter(self, n: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
        """``n`` non-overlapping boxes: random placement with retries, then a 2x2 grid that always fits."""
        for _ in range(20):
            boxes: list[tuple[float, float, float]] = []
            for size in rng.uniform(self.min_object_frac, self.max_object_frac, n):
                for _ in range(30):
                    x, y = rng.uniform(MARGIN, 1 - MARGIN - size, 2)
                    if all(_apart((x, y, size), other) for other in boxes):
                        boxes.append((float(x), float(y), float(size)))
                        break
            if len(boxes) == n:
                return boxes
        cell = (1 - 2 * MARGIN) / 2
        boxes = []
        for c, size in zip(rng.permutation(4)[:n], rng.uniform(self.min_object_frac, self.max_object_frac, n)):
            jitter = rng.uniform(0, cell - GAP - size, 2)
            x, y = MARGIN + (c % 2) * cell + GAP / 2 + jitter[0], MARGIN + (c // 2) * cell + GAP / 2 + jitter[1]
            boxes.append((float(x), float(y), float(size)))
        return boxes

    def _relational_layout(self, include: list[dict], rng: np.random.Generator) -> list[ShapeObject]:
        moved_index = next(i for i, e in enumerate(include) if "position" in e)
        relation, ref_index = include[moved_index]["position"]
        if len(include) != 2 or ref_index == moved_index or any(e["count"] != 1 for e in include):
            raise ValueError("position metadata must hold one reference and one positioned object, one of each")
        if relation not in RELATIONS:
            raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
        moved, ref = include[moved_index], include[ref_index]
        sizes = rng.uniform(self.min_object_frac, self.max_object_frac, 2)  # moved, reference
        gap = rng.uniform(POSITION_GAP, 1 - 2 * MARGIN - sizes.sum())
        start = rng.uniform(MARGIN, 1 - MARGIN - sizes.sum() - gap)
        moved_first = relation in ("left of", "above")
        along = [start, start + sizes[0] + gap] if moved_first else [start + sizes[1] + gap, start]
        centre = rng.uniform(MARGIN + sizes.max() / 2, 1 - MARGIN - sizes.max() / 2)
        jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)
        across = np.clip(centre + jitter, MARGIN + sizes / 2, 1 - MARGIN - sizes / 2) - sizes / 2
        horizontal = relation in ("left of", "right of")
        objects = []
        for entry, a, c, s in zip((moved, ref), along, across, sizes):
            x, y = (a, c) if horizontal else (c, a)
            color = entry.get("color") or self._random_color(rng)
            objects.append(ShapeObject(entry["class"], color, float(x), float(y), float(s)))
        return objects


def write_geneval_folder(root: str | Path, items: Iterable[tuple[dict, Sequence[Image.Image]]]) -> Path:
    """Write GenEval's layout: ``root/<00000>/metadata.jsonl`` (one JSON object on one line; GenEval reads it
    with json.load) and ``root/<00000>/samples/0000.png, ...`` (``vgt_core.benchmarks``, as `vgt bench-geneval`)."""
    from vgt_core.benchmarks import write_geneval_prompt

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for index, (metadata, images) in enumerate(items):
        write_geneval_prompt(root, index, metadata, images)
    return root
