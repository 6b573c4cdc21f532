"""Mini-GenEval for the shapes world: a palette detector and GenEval's per-image rules.

The detector stands in for GenEval's object detector and colour classifier. Each pixel is modelled as a blend
of white and one palette colour (anti-aliased or blurred edges are exactly such blends); a pixel belongs to the
colour whose white-to-colour line it lies closest to, if it is at least half covered and close enough to that
line, so blurred objects keep their true outline and never grow rims of a neighbouring colour. 4-connected
components of one colour are objects. Their class comes from pixel moments rather than the fill ratio of the
box: a blurred small square fills as little of its box as a sharp circle, but its fourth moments stay square
(see ``classify_shape``); a component must still be filled like its class and boxed near-square, or it is
debris. An image whose ink is mostly outside any object (noise, colour fields, smears) fails every task.

``score_folder`` reads GenEval's layout (``<00000>/metadata.jsonl`` + ``samples/<0000>.png``) and summarises
as GenEval does: per-task accuracy over images, overall = mean of the task accuracies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .world import COLORS

_NAMES = tuple(COLORS)
_DIRECTIONS = np.array([COLORS[c] for c in _NAMES], np.float64) - 255.0  # white -> colour
_DIRECTION_NORMS = (_DIRECTIONS**2).sum(1)

# What a drawn object looks like (measured on rendered, blurred and noisy ground truth at 32-128 px: circles
# fill 0.73-0.85 of their box, squares 0.92-1, triangles 0.5-0.84; boxes are square up to rasterisation).
FILL_RANGE = {"circle": (0.62, 0.93), "square": (0.8, 1.0), "triangle": (0.42, 0.88)}
MAX_ASPECT = 1.45
MIN_COVERAGE = 0.5  # a pixel must be at least half colour to belong to an object
# Ink outside every detected object, as a share of the image: ground truth stays under 0.06 even blurred
# (radius 1.5) and noisy at 32 px, random colour fields and pixel noise sit above 0.65. Above this the image is
# not a scene of the world and fails every task (GenEval's detector finds nothing in noise; ours must not).
MAX_STRAY = 0.15
MAX_RESIDUAL = 48.0  # how far (RGB) a pixel may sit from its white-to-colour line
MIN_AREA_FRAC = 0.01  # half the smallest object the world draws (a triangle in a box of 0.2 of the side)
RELATION_MARGIN = 0.1  # GenEval's margin, a fraction of the two boxes' summed sizes


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1; x1 and y1 exclusive
    area: int
    centroid: tuple[float, float]  # x, y in pixels (pixel centres at +0.5)


def _rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float64)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 (or HxWx4) array, got shape {array.shape}")
    array = array[..., :3].astype(np.float64)
    if np.issubdtype(np.asarray(image).dtype, np.floating) and array.size and array.max() <= 1.0:
        array = array * 255.0  # floats in [0, 1]
    return array


def palette_labels(image: Image.Image | np.ndarray, max_residual: float = MAX_RESIDUAL) -> np.ndarray:
    """Per-pixel palette index (``-1`` = background or unrecognised), by projection onto white-to-colour lines."""
    return _palette(image, max_residual)[0]


def _palette(image: Image.Image | np.ndarray, max_residual: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels as ``palette_labels``, and which pixels are ink at all (at least half-way from white to the
    nearest palette colour's distance), labelled or not."""
    rgb = _rgb_array(image)
    offsets = rgb.reshape(-1, 3) - 255.0
    labels = np.full(len(offsets), -1, np.int64)
    # a pixel closer to white than half the shortest white-to-colour line is background for every colour
    candidates = np.flatnonzero((offsets**2).sum(1) >= MIN_COVERAGE**2 * _DIRECTION_NORMS.min())
    offsets = offsets[candidates]
    projections = offsets @ _DIRECTIONS.T
    residual2 = (offsets**2).sum(1, keepdims=True) - projections**2 / _DIRECTION_NORMS
    residual2[projections < MIN_COVERAGE * _DIRECTION_NORMS] = np.inf
    best = residual2.argmin(1)
    accepted = residual2[np.arange(len(best)), best] <= max_residual**2
    labels[candidates[accepted]] = best[accepted]
    ink = np.zeros(len(labels), bool)
    ink[candidates] = True
    return labels.reshape(rgb.shape[:2]), ink.reshape(rgb.shape[:2])


def _runs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal runs of one label: each run's label, and the run index of every pixel (-1 on background)."""
    height, width = labels.shape
    padded = np.full((height, width + 2), -1, np.int64)  # the -1 borders stop runs at row ends
    padded[:, 1:-1] = labels
    flat = padded.ravel()
    starts = np.ones(flat.size, bool)
    starts[1:] = flat[1:] != flat[:-1]
    is_run = flat[starts] >= 0
    run_of_segment = np.where(is_run, np.cumsum(is_run) - 1, -1)
    run_map = run_of_segment[np.cumsum(starts) - 1].reshape(height, width + 2)[:, 1:-1]
    return flat[starts][is_run], run_map


def _components(run_map: np.ndarray, run_labels: np.ndarray) -> np.ndarray:
    """Component root of each run: union-find over vertically touching runs of the same label."""
    upper, lower = run_map[:-1].ravel(), run_map[1:].ravel()
    touching = (upper >= 0) & (lower >= 0)
    upper, lower = upper[touching], lower[touching]
    same = run_labels[upper] == run_labels[lower]
    count = len(run_labels)
    pairs = np.unique(upper[same] * count + lower[same])  # one key per touching pair of runs
    parent = list(range(count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in pairs.tolist():
        ra, rb = find(key // count), find(key % count)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(count)], np.int64)


def classify_shape(skew: float, squareness: float, fill: float, aspect: float) -> str | None:
    """Class of one component from scale-free features that blur and speckle noise barely move:

    * ``skew``: skewness of the pixels' rows (y grows downwards): 0 for circles and squares, -0.57 for an
      upward triangle, whose mass sits low in its box;
    * ``squareness``: E[4 dx^2 dy^2] / E[(dx^2 + dy^2)^2] about the centroid: 0.5 for a circle (any isotropic
      shape), 0.71 for an axis-aligned square;
    * ``fill`` (area / box area) must suit the class and ``aspect`` (width / height) be near 1: this rejects
      rings, lines, ragged blobs and other debris (a noise image must not pass as objects).
    """
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        return None  # every object of the world is drawn in a square box
    if skew < -0.25:
        shape = "triangle"
    else:
        shape = "square" if squareness > 0.6 else "circle"
    low, high = FILL_RANGE[shape]
    return shape if low <= fill <= high else None  # a blob that is not filled like its class is debris


def detect(image: Image.Image | np.ndarray, min_area_frac: float = MIN_AREA_FRAC, max_residual: float = MAX_RESIDUAL) -> list[Detection]:
    """Objects in an image, largest first. Components smaller than ``min_area_frac`` of the image are noise."""
    return _detect(image, min_area_frac, max_residual)[0]


def stray_ink(image: Image.Image | np.ndarray, min_area_frac: float = MIN_AREA_FRAC, max_residual: float = MAX_RESIDUAL) -> float:
    """The share of the image that is ink (not background) but not part of any detected object: ~0 for a
    scene of the world, however blurred or noisy; large for smeared fragments, colour fields or noise."""
    return _detect(image, min_area_frac, max_residual)[1]


def _detect(image: Image.Image | np.ndarray, min_area_frac: float, max_residual: float) -> tuple[list[Detection], float]:
    labels, ink = _palette(image, max_residual)
    height, width = labels.shape
    run_labels, run_map = _runs(labels)
    roots, run_component = np.unique(_components(run_map, run_labels), return_inverse=True)
    ys, xs = np.nonzero(run_map >= 0)
    component = run_component[run_map[ys, xs]]
    count = len(roots)

    def total(values: np.ndarray) -> np.ndarray:
        return np.bincount(component, values, count)

    area = np.bincount(component, minlength=count)
    pixels = np.maximum(area, 1)
    cx, cy = total(xs + 0.5) / pixels, total(ys + 0.5) / pixels
    dx2, dy = (xs + 0.5 - cx[component]) ** 2, ys + 0.5 - cy[component]
    dy2 = dy**2
    skew = total(dy2 * dy) / pixels / np.maximum(total(dy2) / pixels, 1e-9) ** 1.5
    squareness = total(4 * dx2 * dy2) / np.maximum(total((dx2 + dy2) ** 2), 1e-9)
    left, top = np.full(count, width), np.full(count, height)
    right, bottom = np.zeros(count, np.int64), np.zeros(count, np.int64)
    np.minimum.at(left, component, xs)
    np.maximum.at(right, component, xs + 1)
    np.minimum.at(top, component, ys)
    np.maximum.at(bottom, component, ys + 1)
    detections, explained = [], 0
    for k, root in enumerate(roots):
        if area[k] < max(min_area_frac * height * width, 1):
            continue
        box_width, box_height = int(right[k] - left[k]), int(bottom[k] - top[k])
        fill, aspect = area[k] / (box_width * box_height), box_width / box_height
        shape = classify_shape(float(skew[k]), float(squareness[k]), float(fill), aspect)
        if shape is not None:
            bbox = (int(left[k]), int(top[k]), int(right[k]), int(bottom[k]))
            detections.append(Detection(shape, _NAMES[run_labels[root]], bbox, int(area[k]), (float(cx[k]), float(cy[k]))))
            explained += area[k]
    return sorted(detections, key=lambda d: -d.area), float(ink.sum() - explained) / (height * width)


def relations(a: Detection, b: Detection, margin: float = RELATION_MARGIN) -> set[str]:
    """GenEval's relative position of box ``a`` to box ``b``: the centre offset, shrunk per axis by ``margin``
    of the two boxes' summed sizes, normalised by the unshrunk offset's length; a component beyond 0.5 names
    a relation (image y grows downwards)."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.bbox, b.bbox
    offset = np.array([(ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2])
    sizes = np.array([ax1 - ax0 + bx1 - bx0, ay1 - ay0 + by1 - by0], np.float64)
    revised = np.sign(offset) * np.maximum(np.abs(offset) - margin * sizes, 0)
    if np.allclose(revised, 0):
        return set()
    x, y = revised / np.linalg.norm(offset)
    found = set()
    if x < -0.5:
        found.add("left of")
    if x > 0.5:
        found.add("right of")
    if y < -0.5:
        found.add("above")
    if y > 0.5:
        found.add("below")
    return found


def evaluate(detections: list[Detection], metadata: dict) -> tuple[bool, list[str]]:
    """GenEval's rules for one image: whether it is correct, and why not."""
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: -d.area):  # the largest stand for GenEval's most confident
        by_class.setdefault(detection.shape, []).append(detection)
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []  # per include entry, for later position references
    for entry in metadata.get("include", []):
        name, count = entry["class"], entry["count"]
        found = by_class.get(name, [])[:count]
        failure = None
        if len(found) < count:
            failure = f"expected {name}>={count}, found {len(found)}"
        elif "color" in entry and sum(d.color == entry["color"] for d in found) < count:
            failure = f"expected {entry['color']} {name}>={count}, found {[d.color for d in found]}"
        elif "position" in entry:
            relation, target = entry["position"]
            references = matched[target] if 0 <= target < len(matched) else None
            if references is None:
                failure = f"no target for {name} to be {relation}"
            elif not all(relation in relations(d, r) for d in found for r in references):
                failure = f"expected {name} {relation} target"
        if failure:
            reasons.append(failure)
        matched.append(None if failure else found)
    for entry in metadata.get("exclude", []):
        present = len(by_class.get(entry["class"], []))
        if present >= entry["count"]:
            reasons.append(f"expected {entry['class']}<{entry['count']}, found {present}")
    return not reasons, reasons


def score_image(image: Image.Image | np.ndarray, metadata: dict) -> bool:
    """Whether one image satisfies its GenEval metadata (an image that is mostly stray ink fails)."""
    detections, stray = _detect(image, MIN_AREA_FRAC, MAX_RESIDUAL)
    return stray <= MAX_STRAY and evaluate(detections, metadata)[0]


def _score_prompt_folder(folder: Path, metadata: dict) -> tuple[list[bool], int]:
    samples = sorted(p for p in (folder / "samples").glob("*.png") if p.stem.isdigit())
    results, unreadable = [], 0
    for path in samples:
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except Exception:  # PIL raises OSError, SyntaxError, ValueError... for broken files: all count as wrong
            unreadable += 1
            results.append(False)
            continue
        results.append(score_image(image, metadata))
    return results, unreadable


def score_folder(root: str | Path) -> dict:
    """Score a GenEval-layout folder. Unreadable images count as wrong; folders whose metadata cannot be read
    are listed under ``bad_metadata`` and skipped. ``overall`` is 0.0 when no image was scored."""
    per_prompt, tally, unreadable, bad_metadata = [], {}, 0, []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.isdigit()):
        try:
            with open(folder / "metadata.jsonl") as handle:
                metadata = json.load(handle)
            if not isinstance(metadata, dict):
                raise ValueError("metadata is not a JSON object")
        except (OSError, ValueError):
            bad_metadata.append(folder.name)
            continue
        results, broken = _score_prompt_folder(folder, metadata)
        unreadable += broken
        tag = metadata.get("tag", "unknown")
        correct, total = tally.get(tag, (0, 0))
        tally[tag] = (correct + sum(results), total + len(results))
        prompt = metadata.get("prompt", "")
        per_prompt.append(
            dict(folder=folder.name, tag=tag, prompt=prompt, correct=sum(results), total=len(results), unreadable=broken)
        )
    per_task = {tag: correct / total for tag, (correct, total) in sorted(tally.items()) if total}
    return {
        "per_task": per_task,
        "overall": float(np.mean(list(per_task.values()))) if per_task else 0.0,
        "images": sum(total for _, total in tally.values()),
        "correct": sum(correct for correct, _ in tally.values()),
        "unreadable": unreadable,
        "bad_metadata": bad_metadata,
        "per_prompt": per_prompt,
    }


if __name__ == "__main__":
    import sys

    print(json.dumps(score_folder(sys.argv[1]), indent=2))
