"""Generation benchmarks: GenEval's and DPG-Bench's folder layouts written from a ``VGTPipeline``, resumable and
sharded, and the official scorers' result files read back into the paper's table.

The scorers themselves (GenEval's mmdet detector, DPG-Bench's mPLUG VQA) run in their own environments; vgt
writes exactly what they read and reads exactly what they write:

* GenEval (djghosh13/geneval ``evaluation/evaluate_images.py``) visits the sub-folders whose name is all digits,
  reads ``metadata.jsonl`` with ``json.load`` (one object) and the files of ``samples/`` named ``\\d+\\.png``.
* DPG-Bench (ELLA ``dpg_bench/compute_dpg_bench.py``) lists a flat folder, keys each file on
  ``name.split('.')[0]`` (the prompt file's stem) and crops tiles 0..PIC_NUM-1 of a 2x2 grid of ``resolution`` px.

Image ``j`` of prompt ``k`` is generated alone-equivalently from seed ``seed + k * images + j``: the folder does not
depend on the batch size, the shard count or where a run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PIL import Image

from vgt_core.errors import VGTError

GENEVAL_KIND = "vgt-geneval"
DPG_KIND = "vgt-dpg"
SETTINGS_NAME = "vgt-bench.json"  # the generation settings, at the top of --out
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
GENEVAL_COLUMNS = {
    "single_object": "Single Obj.", "two_object": "Two Obj.", "counting": "Counting", "colors": "Colors",
    "position": "Position", "color_attr": "Color Attri.",
}  # fmt: skip
DPG_CATEGORIES = ("global", "entity", "attribute", "relation", "other")
DPG_TILES = 4  # a 2x2 grid; score it with PIC_NUM=4 (the scorer's own default is 1: the top-left tile only)
_SAMPLE_NAME = re.compile(r"\d+\.png")
_TMP_NAME = re.compile(r"\.tmp-(?P<key>.+)-[0-9a-f]{8}(\.png)?")


class BenchmarkError(VGTError, ValueError):
    """Bad benchmark input (prompt files, --shard) or an output folder that cannot be continued."""


# -- shards ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: prompt ``k`` belongs to shard ``k % count`` (round robin, so that every shard
    gets its share of each GenEval task, which the metadata file lists task by task)."""

    index: int = 0
    count: int = 1

    def owns(self, k: int) -> bool:
        return k % self.count == self.index

    def split(self, rank: int, world: int) -> Shard:
        """This shard's part for process ``rank`` of ``world`` (``accelerate launch`` inside one ``--shard``)."""
        return Shard(self.index * world + rank, self.count * world)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"i/n"`` with ``0 <= i < n``."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise BenchmarkError(f"--shard expects i/n with 0 <= i < n (e.g. 0/4 ... 3/4), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


# -- prompts ----------------------------------------------------------------------------------------------------


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file; a line that is not JSON is an error."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}:{number}: not a JSON object ({exc.msg})") from None


def read_geneval_metadata(path: str | os.PathLike) -> list[dict]:
    """GenEval's ``evaluation_metadata.jsonl``: one JSON object with a ``prompt`` per line, in order."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"--metadata: no such file: {path} (GenEval's prompts/evaluation_metadata.jsonl)")
    rows = []
    for number, row in _json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise BenchmarkError(f"{path}:{number}: expected a JSON object with a 'prompt' string")
        rows.append(row)
    if not rows:
        raise BenchmarkError(f"{path}: no prompts")
    return rows


def read_dpg_prompts(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """DPG-Bench's ``prompts/<id>.txt`` as ``(id, prompt)`` sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchmarkError(f"--prompts: no such folder: {folder} (DPG-Bench's dpg_bench/prompts, one <id>.txt per prompt)")
    prompts = []
    for path in sorted(folder.glob("*.txt")):
        if "." in path.stem:  # the scorer keys on name.split('.')[0]: "a.b.png" would be looked up as "a"
            raise BenchmarkError(f"{path}: DPG-Bench keys images on the name before the first dot; a prompt id may not contain one")
        try:
            text = path.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            raise BenchmarkError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not text:
            raise BenchmarkError(f"{path}: empty prompt")
        prompts.append((path.stem, text))
    if not prompts:
        raise BenchmarkError(f"{folder}: no .txt prompt files")
    return prompts


# -- layouts ----------------------------------------------------------------------------------------------------


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Equal-sized images tiled row by row (``columns`` defaults to ceil(sqrt(n)): 4 images -> 2x2)."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        if image.size != (w, h):
            raise ValueError(f"grid images differ in size: {image.size} vs {(w, h)}")
        grid.paste(image.convert("RGB"), ((i % columns) * w, (i // columns) * h))
    return grid


def _png_ok(path: Path, size: tuple[int, int] | None = None) -> bool:
    """A complete, readable PNG (of ``size`` when given): what a killed write does not leave."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or (size is not None and image.size != size):
                return False
            image.verify()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def geneval_folder(root: str | os.PathLike, index: int) -> Path:
    return Path(root) / f"{index:05d}"


def geneval_prompt_complete(folder: Path, metadata: dict, images: int, grid: bool = False) -> bool:
    """``folder`` holds this prompt's metadata and all ``images`` readable samples (and the grid if asked)."""
    try:
        if json.loads((folder / "metadata.jsonl").read_text(encoding="utf-8")) != metadata:
            return False
    except (OSError, ValueError):
        return False
    names = [folder / "samples" / f"{j:04d}.png" for j in range(images)] + ([folder / "grid.png"] if grid else [])
    return all(_png_ok(p) for p in names)


def _geneval_layout_files(folder: Path) -> bool:
    """Every file under ``folder`` is one a GenEval prompt folder holds (what replacing it may remove)."""
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() and rel == "samples":
            continue
        if rel not in ("metadata.jsonl", "grid.png") and not (rel.startswith("samples/") and _SAMPLE_NAME.fullmatch(rel[8:])):
            return False
    return True


def write_geneval_prompt(root: str | os.PathLike, index: int, metadata: dict, images: Sequence[Image.Image], grid: bool = False) -> Path:
    """``root/<index:05d>/metadata.jsonl`` (one JSON object) and ``samples/0000.png ...`` (+ ``grid.png``), written
    into a temporary sibling and renamed into place: a killed run leaves no half-written prompt folder under its
    final name. An existing folder of this prompt (an earlier, incomplete attempt) is replaced, unless it holds
    files a GenEval folder does not, which vgt did not write and does not remove."""
    root = Path(root)
    target = geneval_folder(root, index)
    if target.exists() and not _geneval_layout_files(target):
        raise BenchmarkError(f"{target} holds files that are not GenEval's layout: vgt did not write them and does not replace them")
    tmp = root / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    (tmp / "samples").mkdir(parents=True)
    try:
        (tmp / "metadata.jsonl").write_text(json.dumps(metadata) + "\n", encoding="utf-8")
        for j, image in enumerate(images):
            image.save(tmp / "samples" / f"{j:04d}.png")
        if grid:
            make_grid(images).save(tmp / "grid.png")
        if target.exists():
            old = root / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            shutil.rmtree(old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def dpg_path(root: str | os.PathLike, stem: str) -> Path:
    return Path(root) / f"{stem}.png"


def write_dpg_grid(root: str | os.PathLike, stem: str, images: Sequence[Image.Image]) -> Path:
    """``root/<stem>.png``: the 4 images as one 2x2 grid, written to a temporary file and renamed into place."""
    if len(images) != DPG_TILES:
        raise ValueError(f"DPG-Bench grids hold {DPG_TILES} images, got {len(images)}")
    target = dpg_path(root, stem)
    tmp = Path(root) / f".tmp-{stem}-{uuid.uuid4().hex[:8]}.png"
    try:
        make_grid(images, columns=2).save(tmp, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


# -- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One prompt: its place ``index`` in the benchmark (which fixes its seeds and its shard), whether its output is
    already complete, and how to write it."""

    index: int
    key: str  # the folder or file name
    prompt: str
    done: Callable[[], bool]
    write: Callable[[list[Image.Image]], Any]


def geneval_jobs(root: Path, metadata: list[dict], images: int, grid: bool) -> list[Job]:
    return [
        Job(
            k, f"{k:05d}", m["prompt"],
            done=lambda k=k, m=m: geneval_prompt_complete(geneval_folder(root, k), m, images, grid),
            write=lambda ims, k=k, m=m: write_geneval_prompt(root, k, m, ims, grid),
        )
        for k, m in enumerate(metadata)
    ]  # fmt: skip


def dpg_jobs(root: Path, prompts: list[tuple[str, str]], tile: int) -> list[Job]:
    return [
        Job(
            k, stem, text,
            done=lambda stem=stem: _png_ok(dpg_path(root, stem), (2 * tile, 2 * tile)),
            write=lambda ims, stem=stem: write_dpg_grid(root, stem, ims),
        )
        for k, (stem, text) in enumerate(prompts)
    ]  # fmt: skip


def content_sha256(data: Any) -> str:
    """The sha256 of the prompts as read (JSON): a changed prompt file shows up when a folder is resumed."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def record_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write ``out/vgt-bench.json``, or check that the folder's earlier images were made with the same settings:
    a benchmark folder whose images mix two settings would score neither."""
    path = out / SETTINGS_NAME
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise BenchmarkError(f"{path}: damaged JSON ({exc})") from None
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in differ[:4])
            raise BenchmarkError(
                f"{out} was generated with other settings ({changes}): resuming would mix them. Give another --out, "
                "or the same settings"
            )
        return
    tmp = out / f".settings-{uuid.uuid4().hex[:8]}.partial"
    tmp.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # shards starting together write the same content; a reader never sees half of it


def claim_folder(out: Path, kind: str, shard: Shard) -> Any:
    """Check ``out`` (new, empty, or an earlier benchmark folder of ``kind``), mark it, and lock this shard's part of
    it. Shards lock only their own part, so several ``--shard`` runs (or ranks) write into one folder at once."""
    from filelock import FileLock, Timeout

    from vgt_core.serialization import OUTPUT_MARKER, OutputFolderError, check_output, read_output_marker, write_output_marker

    check_output(out, kind, "reuse")
    out.mkdir(parents=True, exist_ok=True)
    if read_output_marker(out) is None:  # written aside and renamed: a shard starting meanwhile never reads half of it
        aside = out / f".marker-{uuid.uuid4().hex[:8]}.partial"
        aside.mkdir()
        write_output_marker(aside, kind)
        os.replace(aside / OUTPUT_MARKER, out / OUTPUT_MARKER)
        aside.rmdir()
    lock = FileLock(out / f".vgt-lock-shard-{shard.index}-of-{shard.count}", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputFolderError(f"{out}: shard {shard} is being written by another vgt process; wait for it or run another shard") from None
    return lock


def remove_stale_temporaries(out: Path, keys: set[str]) -> None:
    """The temporaries a killed run of these prompts left (``.tmp-<key>-<hex>``); other shards' are theirs."""
    for path in out.glob(".tmp-*"):
        match = _TMP_NAME.fullmatch(path.name)
        if match and match.group("key") in keys:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_jobs(
    pipe: Any,
    jobs: list[Job],
    *,
    images: int,
    seed: int,
    settings: dict[str, Any],
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "benchmark",
) -> dict[str, int]:
    """Generate every job not yet done, ``images`` per prompt, ``batch_size`` images per pipeline call. Image ``j``
    of job ``k`` uses seed ``seed + k * images + j``. Returns counts: ``generated`` and ``skipped`` (already done)."""
    from tqdm.auto import tqdm

    pending = [job for job in jobs if not job.done()]
    per_call = max(1, batch_size // images)
    with tqdm(total=len(pending), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(pending), per_call):
            chunk = pending[start : start + per_call]
            prompts = [job.prompt for job in chunk for _ in range(images)]
            seeds = [seed + job.index * images + j for job in chunk for j in range(images)]
            out = pipe(prompts, seeds=seeds, batch_size=batch_size, progress=False, **settings)
            for i, job in enumerate(chunk):
                job.write(out[i * images : (i + 1) * images])
                bar.update(1)
    return {"generated": len(pending), "skipped": len(jobs) - len(pending)}


# -- scorers' results -------------------------------------------------------------------------------------------


def read_geneval_results(path: str | os.PathLike) -> dict[str, Any]:
    """GenEval's ``evaluate_images.py`` output (one JSON object per image with ``tag`` and ``correct``) summarised
    as its ``summary_scores.py`` does: accuracy per task over images, overall = mean of the task accuracies."""
    path = Path(path)
    tasks: dict[str, list[int]] = {}
    prompts: dict[str, bool] = {}
    for number, row in _json_lines(path):
        if not isinstance(row, dict) or "tag" not in row or "correct" not in row:
            raise BenchmarkError(f"{path}:{number}: not a GenEval result (needs 'tag' and 'correct')")
        correct = bool(row["correct"])
        tasks.setdefault(str(row["tag"]), [0, 0])
        tasks[str(row["tag"])][0] += correct
        tasks[str(row["tag"])][1] += 1
        key = json.dumps(row.get("metadata", row.get("prompt", number)), sort_keys=True)
        prompts[key] = prompts.get(key, False) or correct
    if not tasks:
        raise BenchmarkError(f"{path}: no results")
    per_task = {tag: {"accuracy": c / n, "correct": c, "images": n} for tag, (c, n) in tasks.items()}
    return {
        "source": str(path),
        "tasks": per_task,
        "overall": sum(t["accuracy"] for t in per_task.values()) / len(per_task),
        "images": sum(n for _, n in tasks.values()),
        "prompts": len(prompts),
        "missing_tasks": [t for t in GENEVAL_TASKS if t not in per_task],
    }


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan"


def read_dpg_results(path: str | os.PathLike) -> dict[str, Any]:
    """DPG-Bench's ``compute_dpg_bench.py`` results file: per image ``PATH, tile scores..., mean`` lines, then the
    L1/L2 category scores and ``DPG-Bench score: X`` (all in 0..100). ``pic_num`` is the number of tiles it scored
    per image, read off the per-image lines: 1 means only the top-left image of each grid counted."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    overall = re.search(rf"DPG-Bench score:\s*({_NUMBER})", text)
    if not overall:
        raise BenchmarkError(f"{path}: no 'DPG-Bench score:' line: not a finished DPG-Bench results file")
    categories, section, tiles = {}, None, set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("L1 category scores"):
            section = "l1"
        elif stripped.startswith("L2 category scores"):
            section = "l2"
        elif section == "l1" and line.startswith("\t"):
            name, _, value = stripped.rpartition(":")
            categories[name.strip()] = float(value)
        elif section is None and "," in line:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) >= 3 and all(re.fullmatch(_NUMBER, f) for f in fields[1:]):
                tiles.add(len(fields) - 2)
    return {
        "source": str(path),
        "categories": categories,
        "overall": float(overall.group(1)),
        "pic_num": max(tiles) if tiles else None,
    }


def find_results(path: str | os.PathLike) -> dict[str, Path]:
    """The newest GenEval results (``*.jsonl`` with per-image ``correct``) and DPG-Bench results
    (``dpg-bench_*_results.txt`` or any ``*.txt`` with a ``DPG-Bench score:``) under ``path`` (or ``path`` itself)."""
    path = Path(path)
    if not path.exists():
        raise BenchmarkError(f"{path}: no such file or folder")
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    found: dict[str, Path] = {}
    for p in sorted(candidates, key=lambda p: p.stat().st_mtime):
        if p.suffix == ".jsonl" and p.name != "metadata.jsonl":
            first = next((line for line in p.open(encoding="utf-8", errors="replace") if line.strip()), "")
            try:
                row = json.loads(first)
            except ValueError:
                if p.name == "results.jsonl":  # GenEval's own output name: a damaged one is not silently passed over
                    raise BenchmarkError(f"{p}: line 1 is not JSON (a damaged GenEval results file?)") from None
                continue
            if isinstance(row, dict) and "tag" in row and "correct" in row:
                found["geneval"] = p
        elif p.suffix == ".txt" and not p.name.endswith("_detail.txt") and "DPG-Bench score:" in p.read_text(encoding="utf-8", errors="replace"):
            found["dpg"] = p
    if not found:
        raise BenchmarkError(
            f"{path}: no scorer results found (GenEval: the results .jsonl of evaluation/evaluate_images.py; DPG-Bench: "
            "the dpg-bench_*_results.txt of compute_dpg_bench.py)"
        )
    return found


def summarize(path: str | os.PathLike) -> dict[str, Any]:
    """Every benchmark whose results are under ``path``: ``{"geneval": ..., "dpg": ...}``."""
    readers = {"geneval": read_geneval_results, "dpg": read_dpg_results}
    return {name: readers[name](file) for name, file in find_results(path).items()}


def format_summary(summary: dict[str, Any]) -> str:
    """The paper's Table 3 columns: GenEval per task and overall (0..1), DPG-Bench per category and overall."""
    lines = []
    if "geneval" in summary:
        g = summary["geneval"]
        tags = [t for t in GENEVAL_TASKS if t in g["tasks"]] + sorted(t for t in g["tasks"] if t not in GENEVAL_TASKS)
        head = [GENEVAL_COLUMNS.get(t, t) for t in tags] + ["Overall"]
        row = [f"{g['tasks'][t]['accuracy']:.2f}" for t in tags] + [f"{g['overall']:.2f}"]
        lines += [f"GenEval ({g['images']} images, {g['prompts']} prompts; {g['source']})", _table(head, row)]
        if g["missing_tasks"]:
            lines.append(f"  note: no results for {', '.join(g['missing_tasks'])}; overall is the mean of the tasks present")
    if "dpg" in summary:
        d = summary["dpg"]
        cats = [c for c in DPG_CATEGORIES if c in d["categories"]] + sorted(c for c in d["categories"] if c not in DPG_CATEGORIES)
        head = [c.capitalize() for c in cats] + ["Overall"]
        row = [f"{d['categories'][c]:.2f}" for c in cats] + [f"{d['overall']:.2f}"]
        lines += [("\n" if lines else "") + f"DPG-Bench ({d['source']})", _table(head, row)]
        if d["pic_num"] is not None and d["pic_num"] != DPG_TILES:
            lines.append(f"  warning: scored {d['pic_num']} tile(s) of each 2x2 grid, not 4: rerun the scorer with PIC_NUM=4")
    return "\n".join(lines)


def _table(head: list[str], row: list[str]) -> str:
    widths = [max(len(h), len(r)) for h, r in zip(head, row)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in (head, row))
