"""Shared fixtures: tiny configs of the real transformers/diffusers classes, saved to temporary folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

REPO = Path(__file__).resolve().parents[1]


def builtin_preset(name: str) -> dict:
    """A preset of the repository's registry.yaml as a plain dict (to modify in a test): its base merged and its
    blocks filled in, as ``vgt presets show`` resolves it, before validation."""
    from vgt_core.config import PresetBook

    book = PresetBook()
    book.add_file(REPO / "registry.yaml")
    return book.raw(name)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def images():
    torch.manual_seed(0)
    return torch.rand(2, 3, 64, 64) * 2 - 1


@pytest.fixture
def register_plugin():
    """Register throwaway plugin objects for one test; they are removed afterwards."""
    from vgt_core.plugins import register_plugin as add, unregister_plugin

    names = []

    def register(plugin, name=None):
        names.append(add(plugin, name=name))
        return names[-1]

    yield register
    for name in names:
        unregister_plugin(name)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A torch-fidelity InceptionV3 state dict at random init, saved where a real weights file would be."""
    import torch_fidelity.feature_extractor_inceptionv3 as fi
    from torch import nn

    from vgt_core.metrics import INCEPTION_WEIGHTS_NAME

    with pytest.MonkeyPatch.context() as m:  # replace its download by nothing, and keep the random init
        m.setattr(fi, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():  # variance-preserving init so the random features do not vanish with depth
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


def install_example(folder: Path, target: Path) -> dict[str, str]:
    """pip-install a worked example package of docs/plugins (no dependencies: vgt is already here) into ``target``;
    the environment that puts it on the path of a subprocess, as an installed third-party plugin."""
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target), str(folder)],
        check=True,
        capture_output=True,
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def run_example_contract_tests(folder: Path, test_file: str, env: dict[str, str]) -> None:
    """Run a worked example's own contract test file (``vgt_core.testing`` subclasses) against the installed package."""
    import subprocess
    import sys

    env = {**env, "PYTHONDONTWRITEBYTECODE": "1"}  # nothing written into the docs folder
    args = ["-q", "-p", "no:cacheprovider", "--rootdir", str(folder), "-o", "addopts=", str(folder / test_file)]
    result = subprocess.run([sys.executable, "-m", "pytest", *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
