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
