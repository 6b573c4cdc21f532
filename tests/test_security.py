"""No code path unpickles a weights file: planted pickles whose unpickling would write a marker file are refused
where vgt (or a library it calls) looks for weights, and never run; real tensors-only files load, giving the
same numbers as the libraries' own loading."""

from __future__ import annotations

import pathlib
import re
from pathlib import Path

import pytest
import torch

from vgt_core.losses import LPIPSLoss, torchvision_trunk_file
from vgt_core.metrics import INCEPTION_WEIGHTS_NAME, ReconstructionMetrics, evaluate_reconstruction, inception_v3
from vgt_core.serialization import UnsafeWeightsError, load_state_dict_file


class _Payload:
    """Unpickling this runs ``Path(marker).touch()``: the stand-in for arbitrary code in a weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def plant_pickle(path: Path, marker: Path) -> Path:
    """A torch file that looks like weights but runs code when unpickled; checks that it really would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the plant is live: a plain unpickle runs it...
    assert marker.exists()
    marker.unlink()  # ...so a marker seen after the code under test means that code unpickled it
    return path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, found the way torch finds it (TORCH_HOME)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("TORCH_HUB", raising=False)
    hub = Path(torch.hub.get_dir())
    assert hub == tmp_path / "torch" / "hub"
    return hub / "checkpoints"


def _pairs(n: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    real = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return real, (real * 0.7).flip(-1)


# -- rFID: the Inception weights ----------------------------------------------------------------------------------


def test_a_pickle_in_the_hub_cache_is_refused_by_eval_recon(torch_home, tmp_path):
    marker = tmp_path / "pwned"
    plant_pickle(torch_home / INCEPTION_WEIGHTS_NAME, marker)

    class Identity(torch.nn.Module):
        def encode(self, x):
            return x

        def decode(self, z, size):
            return z

    loader = [{"images": _pairs()[0], "skipped": 0}]
    with pytest.raises(UnsafeWeightsError) as info:  # eval-recon's code path, which finds the file by itself
        evaluate_reconstruction(Identity(), loader, "cpu", progress=False)
    message = str(info.value)
    assert str(torch_home / INCEPTION_WEIGHTS_NAME) in message and "refused" in message and "could run code" in message
    assert not marker.exists()


def test_a_pickle_given_as_inception_weights_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    planted = plant_pickle(tmp_path / "inception.pth", marker)
    with pytest.raises(UnsafeWeightsError, match="refused"):
        ReconstructionMetrics(inception_weights=planted)
    assert not marker.exists()


@pytest.mark.slow
def test_inception_built_from_a_weights_only_file_gives_the_librarys_own_features(random_inception_weights, tmp_path):
    """Same file, two ways: torch-fidelity reading the path itself (its normal path; fine here, we wrote the file)
    and vgt's tensors-only reading. The features must be bit-identical, so rFID is unchanged; a .safetensors copy
    of the same tensors gives them too."""
    from safetensors.torch import save_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    images = (torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    library = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(random_inception_weights))
    expected = library(images)[0]
    assert expected.abs().sum() > 0
    assert torch.equal(inception_v3(random_inception_weights)(images)[0], expected)

    safe = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in load_state_dict_file(random_inception_weights).items()}, str(safe))
    from_safetensors, reference = inception_v3(safe).state_dict(), library.state_dict()
    assert from_safetensors.keys() == reference.keys() and all(torch.equal(from_safetensors[k], reference[k]) for k in reference)


# -- LPIPS: torchvision's trunk and lpips' linear layers ------------------------------------------------------------


@pytest.mark.parametrize("net", ["vgg", "squeeze"])
def test_a_pickle_in_the_hub_cache_is_refused_by_lpips(torch_home, tmp_path, net):
    marker = tmp_path / "pwned"
    planted = plant_pickle(torchvision_trunk_file(net), marker)
    assert planted.parent == torch_home  # where torchvision itself would load it from (weights_only=False)
    with pytest.raises(UnsafeWeightsError) as info:
        LPIPSLoss(net, "pretrained")
    assert str(planted) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()


def test_lpips_without_trunk_weights_offline_says_where_to_put_them(torch_home, monkeypatch):
    from urllib.error import URLError

    from vgt_core.errors import ConfigError

    fetched = []

    def offline(url, dst, **kwargs):  # nothing is downloaded in tests: this is what an offline machine does
        fetched.append((url, dst, kwargs.get("hash_prefix")))
        raise URLError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError) as info:
        LPIPSLoss("vgg", "pretrained")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and "weights_only=True" in message and str(torch_home) in message
    assert fetched == [("https://download.pytorch.org/models/vgg16-397923af.pth", str(torch_home / "vgg16-397923af.pth"), "397923af")]


def _random_squeezenet() -> torch.nn.Module:
    import torchvision.models as tvm

    torch.manual_seed(3)
    return tvm.squeezenet1_1(weights=None)


def test_lpips_from_a_weights_only_trunk_equals_the_librarys_own_loading(torch_home):
    """lpips + torchvision loading the cached file themselves (normal path, offline since it is cached) against
    vgt's tensors-only loading of the same file: the same distances, and not those of an untrained trunk."""
    import lpips

    torch_home.mkdir(parents=True)
    torch.save(_random_squeezenet().state_dict(), torchvision_trunk_file("squeeze"))
    x, y = _pairs(2, 64)
    library = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=False, verbose=False)
    ours = LPIPSLoss("squeeze", "pretrained")
    assert torch.equal(ours(x, y), library(x, y).mean())
    assert not torch.equal(ours(x, y), LPIPSLoss("squeeze", "random")(x, y))


def test_vgg_trunk_loads_torchvision_features_by_index(torch_home):
    """The default trunk: every torchvision ``features.<i>`` tensor lands in lpips' layer <i> (a .safetensors file
    of the features alone is enough: the classifier is not needed)."""
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(4)
    features = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}  # VGG16's, as torchvision names them
    torch_home.mkdir(parents=True)
    save_file(features, str(torchvision_trunk_file("vgg").with_suffix(".safetensors")))
    trunk = LPIPSLoss("vgg", "pretrained").lpips.net.state_dict()
    assert len(trunk) == len(features) == 26
    for name, value in trunk.items():
        assert torch.equal(value, features["features." + name.split(".", 1)[1]]), name


def test_lpips_linear_layers_are_lpips_own(torch_home):
    """lpips ships its linear layers as .pth files; vgt reads them tensors-only and gets what lpips loads."""
    import lpips

    library = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=True, verbose=False).state_dict()
    ours = LPIPSLoss("squeeze", "random").lpips.state_dict()
    lins = [k for k in library if re.match(r"lin\d", k)]
    assert len(lins) == 7 and all(torch.equal(ours[k], library[k]) for k in lins)


# -- the loader itself -------------------------------------------------------------------------------------------


def test_load_state_dict_file_reads_tensors_and_refuses_anything_else(tmp_path):
    state = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save(state, tmp_path / "ok.pth")
    loaded = load_state_dict_file(tmp_path / "ok.pth")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save([torch.ones(1)], tmp_path / "list.pth")  # tensors, but not a state dict
    with pytest.raises(UnsafeWeightsError, match="not a state dict"):
        load_state_dict_file(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(UnsafeWeightsError, match="cannot be read"):
        load_state_dict_file(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError):
        load_state_dict_file(tmp_path / "missing.pth")


def test_eval_recon_reports_a_refused_weights_file_as_a_command_error(tmp_path, capsys, monkeypatch):
    """The command line: exit 2 with the reason, no traceback, and the planted code never ran."""
    import vgt_core.autoencoder as autoencoder
    from vgt_core.cli import main

    class Identity(torch.nn.Module):
        image_size = 32

        def encode(self, x):
            return x

        def decode(self, z, size):
            return z

    monkeypatch.setattr(autoencoder.VGTAutoencoder, "from_pretrained", classmethod(lambda cls, *a, **k: Identity()))
    monkeypatch.setattr("vgt_core.data.open_dataset", lambda data, size: [{"image": torch.zeros(3, 32, 32), "caption": "", "index": 0}])
    marker = tmp_path / "pwned"
    planted = plant_pickle(tmp_path / "inception.pth", marker)
    code = main(["eval-recon", "--model", "m", "--data", "d", "--inception-weights", str(planted), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"vgt eval-recon: error: Inception weights: {planted} refused") and "Traceback" not in err
    assert not marker.exists()
