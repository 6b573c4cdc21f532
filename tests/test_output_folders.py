"""Output folders: every command that writes a folder refuses one holding files vgt did not write (or a file, or
another kind of output) before doing any work, and never overwrites or removes such files; a folder is locked
while a run writes into it; re-running into a command's own output does what its --help says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from vgt_core.cli import main
from vgt_core.latents import LatentDataset, cache_latents
from vgt_core.serialization import (
    LOCK_NAME,
    OUTPUT_MARKER,
    OutputFolderError,
    atomic_folder,
    check_output,
    prepare_output,
    read_output_marker,
)
from vgt_core.training.run import TrainingRun


def user_folder(path: Path) -> dict[Path, bytes]:
    """A folder of a user's own files, named like vgt's to tempt it; returns their contents to compare later."""
    files = {
        path / "preset.json": b'{"mine": true}\n',
        path / "log.jsonl": b'{"step": 1, "my": "notes"}\n',
        path / "model.safetensors": b"my model, not vgt's",
        path / "samples" / "step-1.png": b"my picture",
        path / "manifest.json": b'{"format": "vgt-latents"}',
    }
    for file, data in files.items():
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
    return files


def unchanged(path: Path, files: dict[Path, bytes]) -> bool:
    """Exactly the user's files, byte for byte, and nothing added."""
    present = {p for p in path.rglob("*") if p.is_file()}
    return present == set(files) and all(p.read_bytes() == data for p, data in files.items())


# -- the rule itself ---------------------------------------------------------------------------------------------


def test_new_empty_and_file_paths(tmp_path):
    assert check_output(tmp_path / "new", "vgt-run", "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "vgt-run", "new")
    (tmp_path / "a-file").write_text("x")
    for mode in ("new", "reuse", "replace"):
        with pytest.raises(OutputFolderError, match="is a file"):
            check_output(tmp_path / "a-file", "vgt-run", mode)
        files = user_folder(tmp_path / "user")
        with pytest.raises(OutputFolderError, match="not written by vgt|never overwrites"):
            check_output(tmp_path / "user", "vgt-run", mode)
        assert unchanged(tmp_path / "user", files)


def test_atomic_folder_replaces_only_its_own_output(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, kind="vgt-thing") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"2")
    assert read_output_marker(out) == {"kind": "vgt-thing", "files": ["a.bin", "sub/b.bin"]}
    with atomic_folder(out, kind="vgt-thing") as tmp:  # its own earlier output: replaced as a whole
        (tmp / "c.bin").write_bytes(b"3")
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "c.bin"])

    with pytest.raises(OutputFolderError, match="not a vgt-other one"):
        with atomic_folder(out, kind="vgt-other"):
            pass
    (out / "sub").mkdir()
    (out / "sub" / "mine.txt").write_text("keep me")  # a user's file inside vgt's output
    with pytest.raises(OutputFolderError, match="sub/mine.txt"):
        with atomic_folder(out, kind="vgt-thing"):
            pass
    assert (out / "sub" / "mine.txt").read_text() == "keep me" and (out / "c.bin").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_file_added_while_the_work_ran_stops_the_replacement(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, kind="vgt-thing") as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    with pytest.raises(OutputFolderError, match="late.txt"):
        with atomic_folder(out, kind="vgt-thing") as tmp:
            (tmp / "a.bin").write_bytes(b"2")
            (out / "late.txt").write_text("written meanwhile")
    assert (out / "late.txt").exists() and (out / "a.bin").read_bytes() == b"1"


def test_save_pretrained_never_replaces_a_run_or_a_users_folder(tmp_path):
    """Model folders go through atomic_folder too: a VGT-AE saved over a training run would delete the run."""
    from vgt_core.pipeline import VGTPipeline

    run = prepare_output(tmp_path / "run", "vgt-run")
    run.release()
    (tmp_path / "run" / "log.jsonl").write_text("{}\n")
    files = user_folder(tmp_path / "user")
    for target, why in ((tmp_path / "run", "never replaces"), (tmp_path / "user", "never overwrites")):
        with pytest.raises(OutputFolderError):
            VGTPipeline.save_pretrained(None, target)  # refused before the pipeline is even looked at
        with pytest.raises(OutputFolderError, match=why):
            with atomic_folder(target):  # how VGTAutoencoder / VGTGenerator.save_pretrained write
                pass
    assert (tmp_path / "run" / "log.jsonl").exists() and unchanged(tmp_path / "user", files)


# -- the lock ----------------------------------------------------------------------------------------------------


def test_a_second_holder_of_the_lock_fails_at_once_naming_the_folder(tmp_path):
    out = tmp_path / "run"
    first = prepare_output(out, "vgt-run")
    with pytest.raises(OutputFolderError, match=f"{out} is in use by another vgt process"):
        prepare_output(out, "vgt-run")
    code = (  # another process: flock, not only this process's bookkeeping
        "import sys; from vgt_core.serialization import prepare_output, OutputFolderError\n"
        "try: prepare_output(sys.argv[1], 'vgt-run')\n"
        "except OutputFolderError as e: print(e); sys.exit(3)\n"
    )
    other = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert other.returncode == 3 and "in use" in other.stdout, other.stderr[-2000:]
    first.release()
    prepare_output(out, "vgt-run").release()  # free again once the holder is done
    assert subprocess.run([sys.executable, "-c", code, str(out)], timeout=120).returncode == 0


def test_two_training_runs_into_one_folder(tmp_path):
    out = tmp_path / "run"
    first = TrainingRun(out, precision="no", resume=False, progress=False, preset={"p": 1})
    with pytest.raises(OutputFolderError, match="in use"):
        TrainingRun(out, precision="no", resume=True, progress=False, preset={"p": 2})
    assert json.loads((out / "preset.json").read_text()) == {"p": 1}  # the refused run wrote nothing
    first.log(1, {"loss": 1.0})
    first.finish()
    again = TrainingRun(out, precision="no", resume=True, progress=False, preset={"p": 1})  # documented: its own folder
    again.finish()
    assert (out / LOCK_NAME).exists() and read_output_marker(out) == {"kind": "vgt-run"}


def test_only_the_main_process_takes_the_lock(tmp_path):
    out = tmp_path / "run"
    main_claim = prepare_output(out, "vgt-run")
    other_rank = prepare_output(out, "vgt-run", main_process=False)  # checks the folder, takes no lock
    assert other_rank.lock is None
    main_claim.release()


# -- each command ------------------------------------------------------------------------------------------------


class StubAutoencoder(nn.Module):
    """What cache_latents needs of a VGT-AE; counts the images it encodes."""

    latent_channels, grid, image_size = 2, (2, 2), 8
    latent_norm = type("Norm", (), {"kind": "none"})()

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.encoded = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.encoded += images.shape[0]
        return nn.functional.adaptive_avg_pool2d(images[:, :2], 2) * self.scale


def _images(n: int) -> list[dict]:
    return [{"image": torch.zeros(3, 8, 8), "caption": f"c{i}", "index": i} for i in range(n)]


def test_cache_latents_keeps_a_users_folder_and_replaces_its_own_cache(tmp_path):
    ae = StubAutoencoder()
    files = user_folder(tmp_path / "user")
    with pytest.raises(OutputFolderError, match="never overwrites"):
        cache_latents(ae, _images(3), tmp_path / "user", progress=False)
    assert unchanged(tmp_path / "user", files) and ae.encoded == 0  # refused before any work

    run = tmp_path / "ae-run"  # what the issue saw: --out pointed at an autoencoder's training run
    TrainingRun(run, precision="no", resume=False, progress=False, preset={}).finish()
    with pytest.raises(OutputFolderError, match="vgt-run output, not a vgt-latents"):
        cache_latents(ae, _images(3), run, progress=False)
    assert (run / "preset.json").exists()

    cache = tmp_path / "cache"
    cache_latents(ae, _images(3), cache, progress=False)
    cache_latents(ae, _images(5), cache, progress=False)  # documented: an earlier cache is replaced
    assert len(LatentDataset(cache)) == 5
    (cache / "my-notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="my-notes.txt"):
        cache_latents(ae, _images(2), cache, progress=False)
    assert (cache / "my-notes.txt").read_text() == "mine" and len(LatentDataset(cache)) == 5


def test_cli_cache_latents_into_a_users_folder_exits_2_and_keeps_it(tmp_path, capsys, monkeypatch):
    import vgt_core.autoencoder as autoencoder

    monkeypatch.setattr(autoencoder.VGTAutoencoder, "from_pretrained", classmethod(lambda cls, *a, **k: StubAutoencoder()))
    monkeypatch.setattr("vgt_core.data.open_dataset", lambda data, size: _images(2))
    files = user_folder(tmp_path / "user")
    assert main(["cache-latents", "--autoencoder", "x", "--data", "y", "--out", str(tmp_path / "user"), "--quiet"]) == 2
    assert f"vgt cache-latents: error: {tmp_path / 'user'} is not empty" in capsys.readouterr().err
    assert unchanged(tmp_path / "user", files)


def test_training_into_a_users_folder_errors_and_changes_nothing(tmp_path, capsys):
    files = user_folder(tmp_path / "user")
    for command in (["train-ae"], ["train-ar", "--autoencoder", str(tmp_path / "no-ae")]):
        code = main([*command, "--preset", "tiny-internvl3", "--data", str(tmp_path), "--out", str(tmp_path / "user"), "--quiet"])
        assert code == 2 and "never overwrites" in capsys.readouterr().err
        assert unchanged(tmp_path / "user", files)


def test_training_resumes_a_run_folder_written_before_markers_existed(tmp_path):
    out = tmp_path / "old-run"
    (out / "checkpoints" / "step-00000004").mkdir(parents=True)
    (out / "preset.json").write_text("{}")
    TrainingRun(out, precision="no", resume=True, progress=False, preset={"p": 1}).finish()
    assert read_output_marker(out) == {"kind": "vgt-run"}


def test_generate_and_convert_refuse_a_users_folder_before_loading_anything(tmp_path, capsys):
    files = user_folder(tmp_path / "user")
    out = str(tmp_path / "user")
    assert main(["generate", "--model", str(tmp_path / "no-model"), "--prompt", "a", "--prompt", "b", "--out", out, "--quiet"]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main(["convert-upstream", "--preset", "tiny-internvl3", "--ae", str(tmp_path / "no.pth"), "--out", out, "--quiet"]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert unchanged(tmp_path / "user", files)


def test_demo_refuses_a_non_empty_folder(tmp_path, capsys):
    files = user_folder(tmp_path / "user")
    assert main(["demo", "--out", str(tmp_path / "user"), "--quick", "--quiet"]) == 2
    assert "never overwrites" in capsys.readouterr().err and unchanged(tmp_path / "user", files)
