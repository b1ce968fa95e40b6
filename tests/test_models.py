"""Model loading: built-in CIFAR ResNets, checkpoints in their common wrappings, untrusted files, bad names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt import load_model
from bnadapt.data import to_float_nchw
from bnadapt.models import Classifier, cifar_resnet, load_checkpoint_into


@pytest.mark.parametrize(("depth", "blocks"), [(20, 3), (56, 9), (110, 18)])
def test_cifar_resnet_shapes(depth, blocks):
    m = cifar_resnet(depth)
    assert len(m.net.layer1) == blocks
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert m.preprocessing["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module"])
def test_checkpoint_wrappings(tmp_path, wrap):
    src = cifar_resnet(20).net
    sd = src.state_dict()
    obj = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd},
           "module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}}}[wrap]  # fmt: skip
    torch.save(obj, tmp_path / "ck.pt")
    m = load_model("cifar10_resnet20", checkpoint=tmp_path / "ck.pt")
    assert all(torch.equal(v, m.net.state_dict()[k]) for k, v in sd.items())
    assert not m.training


def test_safetensors_checkpoint_loads_and_a_damaged_one_is_one_error(tmp_path):
    from safetensors.torch import save_file

    src = cifar_resnet(20).net
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "ck.safetensors")
    m = load_model("cifar10_resnet20", checkpoint=tmp_path / "ck.safetensors")
    assert all(torch.equal(v, m.net.state_dict()[k]) for k, v in src.state_dict().items())
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "ck.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="unreadable safetensors file"):
        load_model("cifar10_resnet20", checkpoint=tmp_path / "bad.safetensors")


def test_packaged_augmix_weights_load_without_shared(monkeypatch, tmp_path):
    """The AugMix ResNet-20 ships in the package: it loads with no weights folder at all."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("BNADAPT_WEIGHTS_DIR", raising=False)
    m = load_model("cifar10_resnet20_augmix")
    assert len(m.net.layer1) == 3 and not m.training
    # Trained statistics, not a fresh net's (running mean 0, running variance 1).
    assert not torch.equal(m.net.bn1.running_var, torch.ones(16)) and m.net.bn1.running_mean.abs().max() > 0


def test_checkpoint_without_num_batches_tracked(tmp_path):
    sd = {k: v for k, v in cifar_resnet(20).net.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(sd, tmp_path / "old.th")
    load_model("cifar10_resnet20", checkpoint=tmp_path / "old.th")


def test_wrong_keys_named(tmp_path):
    torch.save(cifar_resnet(20).net.state_dict(), tmp_path / "r20.pt")
    with pytest.raises(ValueError, match=r"missing \(first: \['layer1.3"):
        load_model("cifar10_resnet32", checkpoint=tmp_path / "r20.pt")
    sd = cifar_resnet(20).net.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unexpected \(first: \['extra.weight'\]\)"):
        load_model("cifar10_resnet20", checkpoint=tmp_path / "extra.pt")
    sd = cifar_resnet(20, num_classes=100).net.state_dict()
    torch.save(sd, tmp_path / "c100.pt")
    with pytest.raises(ValueError, match="linear.weight of shape"):
        load_model("cifar10_resnet20", checkpoint=tmp_path / "c100.pt")


def test_pickled_model_refused_unless_trusted(tmp_path):
    net = cifar_resnet(20).net
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="--trust-checkpoint"):
        load_model("cifar10_resnet20", checkpoint=tmp_path / "whole.pt")
    m = load_model("cifar10_resnet20", checkpoint=tmp_path / "whole.pt", trust_checkpoint=True)
    assert torch.equal(m.net.linear.weight, net.linear.weight)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", bytes(range(256)) * 10])
def test_garbage_checkpoint(tmp_path, content):
    (tmp_path / "junk.pt").write_bytes(content)
    with pytest.raises(ValueError, match="expected a PyTorch checkpoint|refusing"):
        load_checkpoint_into(cifar_resnet(20).net, tmp_path / "junk.pt")


def test_bad_names_and_missing_files(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="cifar10_resnet20"):
        load_model("resnet9000")
    with pytest.raises(ValueError, match="torchvision classification model"):
        load_model("torchvision:nope")
    with pytest.raises(FileNotFoundError, match="checkpoint file"):
        load_model("cifar10_resnet20", checkpoint=tmp_path / "none.pt")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"resnet110-\*\.th"):
        load_model("cifar10_resnet110")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model("torchvision:resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        load_model("torchvision:resnet18", weights="V7")


def test_torchvision_model_random_init():
    m = load_model("torchvision:resnet18")
    assert isinstance(m, Classifier) and m.preprocessing["crop"] == 224
    assert m(torch.rand(1, 3, 64, 64)).shape == (1, 1000)


def test_weights_dir_env(tmp_path, monkeypatch):
    torch.save({"state_dict": cifar_resnet(20).net.state_dict()}, tmp_path / "resnet20-abc.th")
    monkeypatch.setenv("BNADAPT_WEIGHTS_DIR", str(tmp_path))
    assert isinstance(load_model("cifar10_resnet20").net.bn1, nn.BatchNorm2d)


@pytest.mark.shared
def test_resnet20_clean_accuracy(shared):
    """The published 91.7% within sampling noise: 91.5% on the 1000 lossless test images."""
    d = np.load(shared / "data" / "cifar10" / "test1000_lossless.npz")
    weights = shared / "data" / "weights" / "akamaster_cifar10_resnet"
    m = load_model("cifar10_resnet20", checkpoint=next(weights.glob("resnet20-*")))
    with torch.inference_mode():
        acc = (m(to_float_nchw(d["x"])).argmax(1).numpy() == d["y"]).mean()
    assert acc == pytest.approx(0.915, abs=1e-9)


@pytest.mark.shared
def test_augmix_resnet20_clean_accuracy(shared):
    """The issue's floor for the AugMix model: at least 89% clean top-1 on the 1000 lossless test images."""
    d = np.load(shared / "data" / "cifar10" / "test1000_lossless.npz")
    m = load_model("cifar10_resnet20_augmix")
    with torch.inference_mode():
        acc = (m(to_float_nchw(d["x"])).argmax(1).numpy() == d["y"]).mean()
    assert acc >= 0.89
